"""Every kind of bad input gets a small OpenAI-shaped 4xx, while a concurrent valid stream
completes."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from conftest import MODEL_NAME, assert_error_shape, raw_http

C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
MSG = [{"role": "user", "content": "hi"}]


def comp(**kw):
    return {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, **kw}


def chat(**kw):
    return {"model": MODEL_NAME, "messages": MSG, "max_tokens": 4, **kw}


def _nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# (id, path, JSON body, status, code, param)
CASES = [
    ("context-overflow", C, comp(max_tokens=100_000), 400, "context_length_exceeded", "max_tokens"),
    ("prompt-too-long", C, comp(prompt=[5] * 600), 400, "context_length_exceeded", None),
    ("chat-context-overflow", CHAT, chat(max_tokens=10_000), 400, "context_length_exceeded", None),
    ("max-tokens-zero", C, comp(max_tokens=0), 400, None, "max_tokens"),
    ("max-tokens-negative", C, comp(max_tokens=-3), 400, None, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, None,
     "max_completion_tokens"),
    ("temperature-negative", C, comp(temperature=-0.5), 400, None, "temperature"),
    ("temperature-string", C, comp(temperature="hot"), 400, None, "temperature"),
    ("temperature-bool", C, comp(temperature=True), 400, None, "temperature"),
    ("top-p-zero", C, comp(top_p=0), 400, None, "top_p"),
    ("top-p-above-one", CHAT, chat(top_p=1.5), 400, None, "top_p"),
    ("top-k-invalid", C, comp(top_k=-7), 400, None, "top_k"),
    ("min-p-above-one", C, comp(min_p=2), 400, None, "min_p"),
    ("presence-penalty", C, comp(presence_penalty=3), 400, None, "presence_penalty"),
    ("frequency-penalty", CHAT, chat(frequency_penalty=-2.5), 400, None, "frequency_penalty"),
    ("repetition-penalty", C, comp(repetition_penalty=0), 400, None, "repetition_penalty"),
    ("n-above-limit", C, comp(n=10_000), 400, None, "n"),
    ("n-zero", C, comp(n=0), 400, None, "n"),
    ("logprobs-above-limit", C, comp(logprobs=21), 400, None, "logprobs"),
    ("top-logprobs-above-limit", CHAT, chat(logprobs=True, top_logprobs=50), 400, None,
     "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, None, "top_logprobs"),
    ("empty-prompt", C, comp(prompt=""), 400, None, "prompt"),
    ("empty-prompt-list", C, comp(prompt=[]), 400, None, "prompt"),
    ("empty-token-list-in-batch", C, comp(prompt=[[1, 2], []]), 400, None, "prompt"),
    ("token-id-out-of-vocab", C, comp(prompt=[10**9]), 400, None, "prompt"),
    ("logit-bias-out-of-vocab", C, comp(logit_bias={"60000": 5}), 400, None, "logit_bias"),
    ("logit-bias-bad-key", C, comp(logit_bias={"abc": 1}), 400, None, "logit_bias"),
    ("logit-bias-out-of-range", C, comp(logit_bias={"5": 101}), 400, None, "logit_bias"),
    ("too-many-sequences", C, comp(prompt=["a"] * 8, n=16), 400, None, "prompt"),
    ("empty-messages", CHAT, chat(messages=[]), 400, None, "messages"),
    ("bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, None, None),
    ("image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "unsupported", None),
    ("too-many-stop", C, comp(stop=[f"s{i}" for i in range(17)]), 400, None, "stop"),
    ("too-long-stop", C, comp(stop=["x" * 257]), 400, None, "stop"),
    ("empty-stop", C, comp(stop=[""]), 400, None, "stop"),
    ("stop-wrong-type", C, comp(stop=[1, 2]), 400, None, "stop"),
    ("prompt-wrong-type", C, comp(prompt={"a": 1}), 400, None, "prompt"),
    ("messages-wrong-type", CHAT, chat(messages="hello"), 400, None, "messages"),
    ("max-tokens-float", C, comp(max_tokens=3.5), 400, None, "max_tokens"),
    ("max-tokens-string", C, comp(max_tokens="5"), 400, None, "max_tokens"),
    ("seed-too-big", C, comp(seed=2**70), 400, None, "seed"),
    ("missing-prompt", C, {"model": MODEL_NAME}, 400, None, "prompt"),
    ("stream-options-without-stream", C, comp(stream_options={"include_usage": True}), 400,
     None, "stream_options"),
    ("suffix", C, comp(suffix="x"), 400, "unsupported", "suffix"),
    ("tool-choice-unknown-function", CHAT, chat(
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), 400, "invalid_value",
     "tool_choice"),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), 400, None, None),
    ("json-mode-unknown", CHAT, chat(response_format={"type": "yaml"}), 400, "invalid_value",
     "response_format.type"),
    ("bad-schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, None, "response_format"),
    ("bad-regex", C, comp(guided_regex="a(("), 400, None, "response_format"),
    ("schema-too-deep", C, comp(guided_json=_nested_arrays(30)), 400, None, "guided_json"),
    ("schema-too-large", C, comp(guided_json={"enum": ["x" * 1000] * 70}), 400, None,
     "guided_json"),
    ("bad-grammar", C, comp(guided_grammar="root ::= undefined_rule"), 400, None,
     "response_format"),
    ("request-chat-template", CHAT, chat(chat_template="{{ 'x' }}"), 400,
     "chat_template_not_allowed", "chat_template"),
    ("unknown-model", C, comp(model="gpt-4"), 404, "model_not_found", "model"),
    ("unknown-model-chat", CHAT, chat(model="nope"), 404, "model_not_found", "model"),
    ("tgi-empty-inputs", GEN, {"inputs": ""}, 400, None, "inputs"),
    ("tgi-temperature-zero", GEN, {"inputs": "x", "parameters": {"temperature": 0}}, 400, None,
     "parameters.temperature"),
    ("tgi-max-new-tokens-zero", GEN, {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 400,
     None, "parameters.max_new_tokens"),
    ("tgi-context-overflow", GEN, {"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, 400,
     "context_length_exceeded", None),
]

# (id, path, raw body bytes, status, code)
RAW_CASES = [
    ("malformed-json", C, b'{"prompt": "hi", ', 400, "invalid_json"),
    ("empty-body", C, b"", 400, "invalid_json"),
    ("not-an-object", C, b'["prompt", "hi"]', 400, "invalid_json"),
    ("a-string", CHAT, b'"hello"', 400, "invalid_json"),
    ("null", GEN, b"null", 400, "invalid_json"),
    ("nan-literal", C, b'{"prompt": "hi", "temperature": NaN}', 400, "invalid_json"),
    ("infinity-literal", C, b'{"prompt": "hi", "temperature": -Infinity}', 400, "invalid_json"),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe hi"}', 400, "invalid_encoding"),
    ("overlong-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}', 400,
     "invalid_encoding"),
    ("lone-surrogate", C, b'{"prompt": "\\ud800"}', 400, "invalid_encoding"),
    ("lone-low-surrogate", CHAT,
     b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}', 400, "invalid_encoding"),
    ("temperature-overflows-to-inf", C, b'{"prompt": "hi", "temperature": 1e999}', 400,
     "invalid_value"),
    ("huge-int", C, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "invalid_json"),
    ("deep-nesting", C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("utf16-body", C, '{"prompt": "hi"}'.encode("utf-16"), 400, "invalid_encoding"),
]


class ValidStream:
    """A streaming completion running in a thread while the bad request is made."""

    def __init__(self, base_url: str):
        self.text, self.finish, self.error = "", None, None
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)
        self._thread.start()

    def _run(self, base_url: str) -> None:
        try:
            with httpx.stream("POST", base_url + C, timeout=60, json=comp(
                    max_tokens=24, temperature=0, ignore_eos=True, stream=True)) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"][0]
                        self.text += ch["text"]
                        self.finish = ch["finish_reason"] or self.finish
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def check(self) -> None:
        self._thread.join(60)
        assert self.error is None, self.error
        assert self.finish == "length" and self.text


@pytest.mark.parametrize("path,body,status,code,param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_json_input(server, path, body, status, code, param):
    valid = ValidStream(server.base_url)
    r = httpx.post(server.base_url + path, json=body, timeout=30)
    assert_error_shape(r, status, code, param)
    valid.check()


@pytest.mark.parametrize("path,raw,status,code", [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_bad_raw_body(server, path, raw, status, code):
    valid = ValidStream(server.base_url)
    r = httpx.post(server.base_url + path, content=raw, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert_error_shape(r, status, code)
    valid.check()


def test_error_body_small_with_many_errors(server):
    messages = [{"role": "bogus", "content": i} for i in range(20_000)]
    valid = ValidStream(server.base_url)
    r = httpx.post(server.base_url + CHAT, json=chat(messages=messages), timeout=30)
    err = assert_error_shape(r, 400)
    assert "more errors" in err["message"]
    valid.check()


def test_body_over_limit_413(server):
    valid = ValidStream(server.base_url)
    big = comp(prompt="x " * (600 * 1024))
    r = httpx.post(server.base_url + C, json=big, timeout=30)
    assert_error_shape(r, 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(server.base_url + C, content=chunks(), timeout=30)
    assert_error_shape(r, 413, "request_too_large")
    # Declared too large: refused before the body is read.
    status, body = raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 999999999\r\n"
                            b"Connection: close\r\n\r\n")
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    valid.check()


def test_unknown_route_and_method(server):
    r = httpx.get(server.base_url + "/v2/nothing")
    assert_error_shape(r, 404)
    r = httpx.get(server.base_url + C)
    assert_error_shape(r, 405)
    r = httpx.get(server.base_url + "/v1/models/other-model")
    assert_error_shape(r, 404, "model_not_found")


def test_chat_template_from_request_when_allowed(server):
    cfg = server.cfg
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg.allow_request_chat_template = True
    try:
        r = httpx.post(server.base_url + CHAT, json=chat(chat_template=template), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1  # just "hi"
        # The sandbox refuses attribute access to Python internals: a 400, not a crash.
        evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
        r = httpx.post(server.base_url + CHAT, json=chat(chat_template=evil), timeout=30)
        assert_error_shape(r, 400, "invalid_chat")
    finally:
        cfg.allow_request_chat_template = False


def test_a_request_template_that_never_ends_is_stopped_and_others_go_on(server):
    cfg = server.cfg
    cfg.allow_request_chat_template = True
    endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
               "{% endfor %}")
    try:
        t0 = time.monotonic()
        r = httpx.post(server.base_url + CHAT, json=chat(chat_template=endless), timeout=120)
        assert_error_shape(r, 400, "invalid_chat")
        assert "did not finish rendering" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 60  # the start of the renderer process, then 2 s
        r = httpx.post(server.base_url + CHAT, json=chat(), timeout=30)  # the server's template
        assert r.status_code == 200, r.text
        huge = "{{ 'x' * 5000000 }}"
        r = httpx.post(server.base_url + CHAT, json=chat(chat_template=huge), timeout=120)
        assert_error_shape(r, 400, "invalid_chat")
        assert "characters" in r.json()["error"]["message"]
        template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a new child
        r = httpx.post(server.base_url + CHAT, json=chat(chat_template=template), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1
    finally:
        cfg.allow_request_chat_template = False
