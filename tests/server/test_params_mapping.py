"""Request body -> SamplingParams, field by field (server/params.py; no server process).

Each body goes the server's way: JSON text -> parse_json_object -> the strict pydantic model ->
completion_params / chat_params / tgi_params. For every field the endpoint declares, a
non-default valid value must arrive in SamplingParams, and change nothing else there; fields
that are not sampling options must change nothing at all; defaults must give SamplingParams'
defaults. The field lists are checked against the models and SamplingParams themselves, so a
field added to either without a mapping (a silently dropped option) fails here.
"""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from turbollm.sampling_params import SamplingParams
from turbollm.server.config import ServerConfig
from turbollm.server.errors import APIError
from turbollm.server.params import chat_params, completion_params, tgi_params
from turbollm.server.protocol import (ChatCompletionRequest, CompletionRequest, TGIParameters,
                                      TGIRequest)
from turbollm.server.request_body import parse_json_object
from turbollm.structured_spec import StructuredOutputSpec as Spec

CFG = ServerConfig()
TOOL = {"type": "function", "function": {"name": "get", "parameters": {
    "type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}}}
CALL = {"type": "object", "properties": {"name": {"type": "string", "enum": ["get"]},
                                         "arguments": TOOL["function"]["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "hi"}]


def sp_values(sp: SamplingParams) -> dict:
    """The SamplingParams fields that define it (not the derived max_stop_len)."""
    return {f.name: getattr(sp, f.name) for f in fields(sp) if f.compare}


def completion(cfg=CFG, **body) -> SamplingParams:
    raw = json.dumps({"prompt": "hi", **body}).encode()
    return completion_params(CompletionRequest.model_validate(parse_json_object(raw)), cfg)


def chat(cfg=CFG, **body) -> SamplingParams:
    raw = json.dumps({"messages": MSGS, **body}).encode()
    return chat_params(ChatCompletionRequest.model_validate(parse_json_object(raw)), cfg)


def tgi(cfg=CFG, **parameters) -> SamplingParams:
    raw = json.dumps({"inputs": "hi", "parameters": parameters}).encode()
    return tgi_params(TGIRequest.model_validate(parse_json_object(raw)), cfg)


def changed(sp: SamplingParams, base: SamplingParams) -> dict:
    """{field: new value} where sp differs from base."""
    a, b = sp_values(sp), sp_values(base)
    return {k: v for k, v in a.items() if v != b[k]}


# (body field, JSON value, {SamplingParams field: value it must arrive as}). Values are chosen
# unlike the defaults, including falsy ones (temperature 0, seed 0, logprobs 0) that an
# `if value:` in the mapping would drop.
SHARED = [
    ("n", 3, {"n": 3}),
    ("temperature", 0.25, {"temperature": 0.25}),
    ("temperature", 0, {"temperature": 0.0}),
    ("top_p", 0.5, {"top_p": 0.5}),
    ("top_k", 7, {"top_k": 7}),
    ("min_p", 0.2, {"min_p": 0.2}),
    ("seed", 1234, {"seed": 1234}),
    ("seed", 0, {"seed": 0}),
    ("seed", 2**64 - 1, {"seed": 2**64 - 1}),
    ("presence_penalty", 0.5, {"presence_penalty": 0.5}),
    ("frequency_penalty", -0.75, {"frequency_penalty": -0.75}),
    ("repetition_penalty", 1.3, {"repetition_penalty": 1.3}),
    ("stop", ["foo", "bar"], {"stop": ["foo", "bar"]}),
    ("stop", "end", {"stop": ["end"]}),  # one string is a one-element list
    ("stop_token_ids", [5, 9], {"stop_token_ids": [5, 9]}),
    ("ignore_eos", True, {"ignore_eos": True}),
    ("min_tokens", 3, {"min_tokens": 3}),
    ("logit_bias", {"50": -5.5, "7": 100}, {"logit_bias": {50: -5.5, 7: 100.0}}),  # JSON keys
    ("skip_special_tokens", False, {"skip_special_tokens": False}),
    ("include_stop_str_in_output", True, {"include_stop_str_in_output": True}),
    # output constraints (server/structured.py)
    ("response_format", {"type": "json_object"}, {"structured_output": Spec.json_object()}),
    ("response_format", {"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": {"type": "object", "properties": {
            "b": {"type": "integer"}, "a": {"type": "string"}}}}},
     {"structured_output": Spec("json", '{"type":"object","properties":{"b":{"type":'
                                         '"integer"},"a":{"type":"string"}}}')}),
    ("guided_json", {"type": "integer"}, {"structured_output": Spec("json", '{"type":"integer"}')}),
    ("guided_json", '{"type": "integer"}',
     {"structured_output": Spec("json", '{"type":"integer"}')}),
    ("guided_regex", "[a-z]+", {"structured_output": Spec("regex", "[a-z]+")}),
    ("guided_choice", ["yes", "no"], {"structured_output": Spec("choice", ("yes", "no"))}),
    ("guided_grammar", 'root ::= "a"', {"structured_output": Spec("grammar", 'root ::= "a"')}),
    ("structured_outputs", {"choice": ["x"]}, {"structured_output": Spec("choice", ("x",))}),
    ("structured_outputs", {"json_object": True}, {"structured_output": Spec.json_object()}),
]
COMPLETION_ONLY = [
    ("max_tokens", 5, {"max_tokens": 5}),
    ("max_tokens", None, {"max_tokens": None}),  # explicit null: up to the context length
    ("logprobs", 3, {"logprobs": 3}),
    ("logprobs", 0, {"logprobs": 0}),  # the sampled token's logprob only
]
CHAT_ONLY = [
    ("max_tokens", 9, {"max_tokens": 9}),
    ("max_completion_tokens", 7, {"max_tokens": 7}),
    ("logprobs", True, {"logprobs": 0}),
]
# Fields that are no sampling option: a valid non-default value must leave SamplingParams as it
# is (what they do is checked by the serving tests). Values the server refuses are below.
COMPLETION_INERT = [
    ("model", "tiny"), ("user", "u-1"), ("stream", True), ("prompt", [1, 2, 3]),
    ("echo", True),  # without logprobs: the prompt text is echoed, nothing is scored
    ("suffix", ""), ("best_of", 1),  # best_of == n is the one value allowed
]
CHAT_INERT = [
    ("model", "tiny"), ("user", "u-1"), ("stream", True),
    ("messages", [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]),
    ("tools", []), ("tool_choice", "auto"), ("tool_choice", "none"),
    ("tools", [TOOL]),  # auto: the model may call it; nothing is constrained
    ("parallel_tool_calls", False),
]
# Fields whose effect needs another field with them.
COMPLETION_PAIRS = [
    ({"echo": True, "logprobs": 2}, {"logprobs": 2, "prompt_logprobs": 2}),
    ({"n": 2, "best_of": 2}, {"n": 2}),
    ({"stream": True, "stream_options": {"include_usage": True}}, {}),
    ({"min_tokens": 5, "max_tokens": 5}, {"min_tokens": 5, "max_tokens": 5}),
]
CHAT_PAIRS = [
    ({"logprobs": True, "top_logprobs": 5}, {"logprobs": 5}),
    ({"logprobs": True, "top_logprobs": 0}, {"logprobs": 0}),
    ({"max_tokens": 9, "max_completion_tokens": 7}, {"max_tokens": 7}),  # the newer name wins
    ({"stream": True, "stream_options": {"include_usage": True}}, {}),
    ({"chat_template": "{{ messages[0].content }}"}, {}),  # with the operator's permission
]
CHAT_PAIRS += [  # a forced tool call is a JSON constraint on the answer
    ({"tools": [TOOL], "tool_choice": "required"}, {"structured_output": Spec.json(CALL)}),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get"}}},
     {"structured_output": Spec.json(CALL)}),
]
CHAT_CFG = ServerConfig(allow_request_chat_template=True)
# SamplingParams fields no endpoint sets: the engine never reads spaces_between_special_tokens,
# and the server always detokenizes (stop strings and text need it).
UNREACHED = {"spaces_between_special_tokens", "detokenize"}


def _ids(cases):
    return [f"{c[0]}={c[1]!r}" for c in cases]


@pytest.mark.parametrize("field,value,want", SHARED + COMPLETION_ONLY,
                         ids=_ids(SHARED + COMPLETION_ONLY))
def test_completion_field_arrives(field, value, want):
    base = completion()
    assert all(sp_values(base)[k] != v for k, v in want.items()), "pick a non-default value"
    assert changed(completion(**{field: value}), base) == want


@pytest.mark.parametrize("field,value,want", SHARED + CHAT_ONLY, ids=_ids(SHARED + CHAT_ONLY))
def test_chat_field_arrives(field, value, want):
    base = chat()
    assert all(sp_values(base)[k] != v for k, v in want.items()), "pick a non-default value"
    assert changed(chat(**{field: value}), base) == want


@pytest.mark.parametrize("body,want", COMPLETION_PAIRS, ids=[str(b) for b, _ in COMPLETION_PAIRS])
def test_completion_field_combinations(body, want):
    assert changed(completion(**body), completion()) == want


@pytest.mark.parametrize("body,want", CHAT_PAIRS, ids=[str(b) for b, _ in CHAT_PAIRS])
def test_chat_field_combinations(body, want):
    assert changed(chat(CHAT_CFG, **body), chat()) == want


@pytest.mark.parametrize("field,value", COMPLETION_INERT, ids=_ids(COMPLETION_INERT))
def test_completion_non_sampling_fields_change_nothing(field, value):
    assert sp_values(completion(**{field: value})) == sp_values(completion())


@pytest.mark.parametrize("field,value", CHAT_INERT, ids=_ids(CHAT_INERT))
def test_chat_non_sampling_fields_change_nothing(field, value):
    assert sp_values(chat(**{field: value})) == sp_values(chat())


def test_defaults_map_to_sampling_params_defaults():
    assert sp_values(completion()) == sp_values(SamplingParams())
    # Chat differs in one field on purpose: OpenAI chat has no max_tokens default (the answer
    # may run to the context length), completions default to 16 like SamplingParams.
    assert sp_values(chat()) == sp_values(SamplingParams(max_tokens=None))
    # TGI: greedy unless asked to sample, and max_new_tokens defaults to 100.
    assert sp_values(tgi()) == sp_values(SamplingParams(max_tokens=100, temperature=0.0))
    # Sending the defaults explicitly is the same as leaving them out.
    explicit = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                "stop": None, "stop_token_ids": None, "ignore_eos": False, "min_tokens": 0,
                "logit_bias": None, "seed": None, "skip_special_tokens": True,
                "include_stop_str_in_output": False}
    assert sp_values(completion(**explicit, max_tokens=16, logprobs=None)) == \
        sp_values(SamplingParams())
    assert sp_values(chat(**explicit, logprobs=False)) == sp_values(chat())


def test_top_k_minus_one_means_disabled():
    # vLLM's "disabled" spelling is accepted and normalized to SamplingParams' 0.
    assert completion(top_k=-1).top_k == 0 == SamplingParams().top_k


TGI_CASES = [
    ({"max_new_tokens": 7}, {"max_tokens": 7}),
    ({"max_new_tokens": None}, {"max_tokens": None}),
    ({"do_sample": True}, {"temperature": 1.0}),
    ({"temperature": 0.5}, {"temperature": 0.5}),  # a sampling knob turns sampling on
    ({"top_p": 0.9}, {"temperature": 1.0, "top_p": 0.9}),
    ({"top_k": 5}, {"temperature": 1.0, "top_k": 5}),
    ({"do_sample": True, "top_p": 0.9, "top_k": 5, "temperature": 0.7},
     {"temperature": 0.7, "top_p": 0.9, "top_k": 5}),
    ({"stop": ["\n\n"]}, {"stop": ["\n\n"]}),
    ({"seed": 42}, {"seed": 42}),
    ({"seed": 0}, {"seed": 0}),
    ({"repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),
    ({"frequency_penalty": 0.4}, {"frequency_penalty": 0.4}),
    ({"return_full_text": True}, {}),  # response shape only
    ({"details": True}, {}),
    ({"best_of": 1}, {}),
    ({"adapter_id": "a"}, {}),  # which LoRA adapter runs (serving_tgi.py), not a sampling knob
    ({"grammar": {"type": "regex", "value": "[ab]+"}},
     {"structured_output": Spec.regex("[ab]+")}),
]


@pytest.mark.parametrize("parameters,want", TGI_CASES, ids=[str(p) for p, _ in TGI_CASES])
def test_tgi_parameter_arrives(parameters, want):
    assert changed(tgi(**parameters), tgi()) == want


@pytest.mark.parametrize("call,body,param", [
    (completion, {"suffix": "x"}, "suffix"),
    (completion, {"best_of": 3}, "best_of"),
    (completion, {"stream_options": {"include_usage": True}}, "stream_options"),
    (chat, {"top_logprobs": 2}, "top_logprobs"),
    (chat, {"tools": [TOOL, TOOL]}, "tools"),  # the same name twice
    (chat, {"tool_choice": "required"}, "tool_choice"),  # no tools
    (chat, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    (chat, {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    (chat, {"tools": [TOOL], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    (chat, {"response_format": {"type": "xml"}}, "response_format.type"),
    (chat, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (completion, {"guided_json": "{not json"}, "guided_json"),
    (completion, {"guided_json": "[1]"}, "guided_json"),  # JSON, but not a schema
    (completion, {"guided_choice": []}, "guided_choice"),
    (completion, {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    (chat, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    (chat, {"guided_regex": "a", "min_tokens": 2}, "min_tokens"),  # SamplingParams refuses it
    (chat, {"chat_template": "{{ 1 }}"}, "chat_template"),  # the default config forbids it
    (completion, {"min_tokens": 20}, "min_tokens"),  # > max_tokens 16: SamplingParams refuses
    (chat, {"max_completion_tokens": 2, "min_tokens": 3}, "min_tokens"),
])
def test_refused_values_are_400_naming_the_field(call, body, param):
    # Known fields the server does not honour are refused, never silently ignored.
    with pytest.raises(APIError) as e:
        call(**body)
    assert e.value.status == 400
    assert e.value.param == param


def _covered(cases) -> set[str]:
    names = set()
    for c in cases:
        names |= set(c[0]) if isinstance(c[0], dict) else {c[0]}
    return names


@pytest.mark.parametrize("model,cases", [
    (CompletionRequest, SHARED + COMPLETION_ONLY + COMPLETION_INERT + COMPLETION_PAIRS),
    (ChatCompletionRequest, SHARED + CHAT_ONLY + CHAT_INERT + CHAT_PAIRS),
    (TGIParameters, TGI_CASES),
], ids=["completions", "chat", "tgi"])
def test_every_declared_field_is_tested(model, cases):
    # A field added to the request model without a case here fails: it has to be shown to
    # arrive in SamplingParams, or to be no sampling option.
    assert set(model.model_fields) - _covered(cases) == set()


def test_every_sampling_params_field_is_reachable():
    # Everything a client can set, across the endpoints, against what SamplingParams has: a new
    # SamplingParams option the server does not expose fails here until it is mapped or listed.
    reached = set()
    for cases in (SHARED, COMPLETION_ONLY, CHAT_ONLY, TGI_CASES, COMPLETION_PAIRS, CHAT_PAIRS):
        for c in cases:
            reached |= set(c[-1])
    assert set(sp_values(SamplingParams())) - reached == UNREACHED
