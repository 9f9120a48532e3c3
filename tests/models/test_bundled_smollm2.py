"""The bundled SmolLM2-135M (GGUF Q4_1) against Hugging Face transformers in fp32.

The reference loads the same file with transformers' own GGUF reader and runs transformers'
own Llama forward, so both the weights path and the model math are checked independently.
"""
import pytest
import torch

from turbollm import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, a small robot",
]


@pytest.fixture(scope="module")
def ours():
    return LLM("smollm2-135m", dtype="float32", kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def reference(bundled_gguf):
    from turbollm.bench.peers import hf_model_from_gguf
    return hf_model_from_gguf(bundled_gguf, torch.float32)


def test_greedy_64_tokens_identical_to_transformers(ours, reference):
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    outs = ours.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            gen = reference.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        assert out.outputs[0].token_ids == gen[0, ids.shape[1]:].tolist(), prompt


def test_default_configuration_greedy_against_transformers(reference):
    """The default configuration (Q4_1/Q8_0 served natively, int16-rounded activations for few
    rows, bf16 storage, AMX bf16 prefill where present) against transformers' fp32 forward of
    the same file. Not bit-exact by design, so: the first 8 greedy tokens of every prompt
    equal transformers', and over 32 tokens at least 3 of 4 prompts stay identical (a greedy
    answer that meets a near-tie may take the other branch and then diverge for good)."""
    ours = LLM(kv_cache_memory="64MiB", max_model_len=1024)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    identical = 0
    for prompt, out in zip(PROMPTS, ours.generate(PROMPTS, params)):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            gen = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, ids.shape[1]:].tolist()
        got = out.outputs[0].token_ids
        assert got[:8] == gen[:8], prompt
        identical += got == gen
    assert identical >= 3


def test_chat_answers_with_template(ours):
    out = ours.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(max_tokens=32, temperature=0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_bundled_default_dtype_and_config(ours):
    arch = ours.engine.arch
    assert (arch.num_hidden_layers, arch.hidden_size, arch.num_attention_heads,
            arch.num_key_value_heads, arch.head_dim, arch.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert arch.tie_word_embeddings and arch.rope_theta == 100000.0
    # The context is the model's 8192, capped by what the 64 MiB fp32 KV cache holds.
    per_token = 2 * 30 * 3 * 64 * 4
    assert ours.engine.max_model_len == min(8192, (64 * 2**20 // (16 * per_token)) * 16)
