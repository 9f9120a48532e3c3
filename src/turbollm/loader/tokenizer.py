"""Tokenizers: an HF fast tokenizer from an HF model directory, or built from a GGUF file's metadata.

For GGUF files with a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`: SmolLM, Qwen2,
Llama 3, ...) we build the `tokenizers.Tokenizer` directly from the stored vocabulary and merges,
which takes well under a second; transformers' own GGUF path (`gguf_file=`) parses the file with
`gguf.GGUFReader` twice and takes ~10 s on our machine. Other vocabularies (sentencepiece `llama`)
fall back to transformers.

The pre-tokenizer follows `tokenizer.ggml.pre`, i.e. what llama.cpp does and what the original HF
tokenizer did (e.g. SmolLM splits digits one by one before the GPT-2 regex); tests check the ids
equal transformers' GGUF tokenizer on the bundled model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from turbollm.loader.gguf_file import GGUF_MAGIC, GGUFFile

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the pre-tokenizers llama.cpp knows by `tokenizer.ggml.pre` name. The GPT-2
# regex itself is built into the ByteLevel pre-tokenizer (use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
# Vocabularies trained with every digit split off before the GPT-2 regex.
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
# Llama 3's tokenizer looks whole pre-tokens up in the vocabulary before merging (llama.cpp too).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}


def load_tokenizer(source: str | Path, *, gguf_file: str | None = None) -> Any:
    """Fast HF tokenizer (with chat template) for an HF directory, a GGUF file, or a dir + `gguf_file`."""
    path = Path(source) / gguf_file if gguf_file is not None else Path(source)
    if path.is_file() and _is_gguf(path):
        return tokenizer_from_gguf(path)
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.exists() or gguf_file is not None:
        raise ValueError(f"{path} is neither a GGUF file nor a directory with a tokenizer")
    return AutoTokenizer.from_pretrained(str(source))  # a hub id: may use the network or the cache


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def tokenizer_from_gguf(path: str | Path, metadata: dict[str, Any] | None = None) -> Any:
    """Fast HF tokenizer described by a GGUF file (pass `metadata` if the file is already parsed)."""
    if metadata is None:
        metadata = GGUFFile(path).metadata
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        return _transformers_gguf_tokenizer(Path(path))
    return build_bpe_tokenizer(metadata)


def _transformers_gguf_tokenizer(path: Path) -> Any:
    """transformers' own GGUF tokenizer (sentencepiece vocabularies); slow but complete."""
    from transformers import AutoTokenizer

    # local_files_only: a local file must never make transformers ask the hub
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # control bytes, space, DEL, ... -> characters 256, 257, ...
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_bpe_tokenizer(metadata: dict[str, Any]) -> Any:
    """PreTrainedTokenizerFast for a byte-level BPE vocabulary from GGUF `tokenizer.*` metadata."""
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else types.tolist()
    pre = metadata.get("tokenizer.ggml.pre", "default")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(token: str) -> str:
        # A token written with characters outside the byte alphabet (e.g. a raw space) is respelled.
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special; user-defined ones (<think>) are matched whole but
    # kept in decoded text. A "control" token outside the byte alphabet is a mislabel: skip it.
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    user_defined = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _pre_tokenizer(pre: str) -> Any:
    """The pre-tokenizer llama.cpp uses for this `tokenizer.ggml.pre` (GPT-2's by default)."""
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level
