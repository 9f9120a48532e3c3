"""server/tools.py without a server: plans, the Hermes-format parser, streaming hold-back."""
from __future__ import annotations

import json

import pytest

from turbollm.server.errors import APIError
from turbollm.server.protocol import ChatCompletionRequest
from turbollm.server.tool_parsers import HermesParser
from turbollm.server.tools import ToolPlan, ToolStream, parse_answer, plan_tools, with_tool_prompt

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time"}}
MSGS = [{"role": "user", "content": "hi"}]


def plan(**body) -> ToolPlan | None:
    return plan_tools(ChatCompletionRequest.model_validate({"messages": MSGS, **body}))


def test_plans():
    assert plan() is None and plan(tools=[WEATHER], tool_choice="none") is None
    auto = plan(tools=[WEATHER, TIME])
    assert auto.mode == "auto" and not auto.forced
    req = plan(tools=[WEATHER, TIME], tool_choice="required")
    assert req.forced and len(req.constraint.schema()["anyOf"]) == 2
    named = plan(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                     "function": {"name": "time"}})
    assert named.constraint.schema()["properties"]["name"]["enum"] == ["time"]
    for bad in ({"tool_choice": "required"}, {"tools": [WEATHER], "tool_choice": "maybe"},
                {"tools": [WEATHER], "tool_choice": {"type": "function"}}):
        with pytest.raises(APIError) as e:
            plan(**bad)
        assert e.value.status == 400 and e.value.param == "tool_choice"


def test_parse_forced_and_auto_answers():
    forced = plan(tools=[WEATHER], tool_choice="required")
    content, calls = parse_answer(forced, '{"name": "weather", "arguments": {"city": "Oslo"}}')
    assert content is None and calls[0]["function"]["name"] == "weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    auto = plan(tools=[WEATHER, TIME])
    text = ('Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n'
            '</tool_call>\n<tool_call>{"name": "time", "arguments": "{}"}</tool_call>')
    content, calls = parse_answer(auto, text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == [
        "weather", "time"]
    assert parse_answer(auto, "just words") == ("just words", [])
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'  # unknown function
    assert parse_answer(auto, bad) == (bad, [])
    assert parse_answer(auto, "<tool_call>{not json") == ("<tool_call>{not json", [])


def test_stream_holds_back_tool_calls():
    safe_prefix_len = HermesParser().safe_prefix_len
    assert safe_prefix_len("abc <tool") == 4 and safe_prefix_len("a < b") == 5
    auto = plan(tools=[WEATHER])
    s = ToolStream(auto)
    parts = ["Sure", ". <tool", '_call>{"name": "weather", ', '"arguments": {"city": "X"}}',
             "</tool_call>"]
    sent = "".join(s.feed(p) for p in parts)
    assert sent == "Sure. "
    rest, calls, finish = s.finish("stop")
    assert finish == "tool_calls" and len(calls) == 1 and rest == ""
    s = ToolStream(auto)  # a "<" that is not a tag goes out once it is clear
    assert s.feed("1 <") == "1 " and s.feed(" 2") == "< 2"
    assert s.finish("stop") == ("", [], "stop")
    forced = ToolStream(plan(tools=[WEATHER], tool_choice="required"))
    assert forced.feed('{"name": "weather", "arguments": {"city": "Y"}}') == ""
    rest, calls, finish = forced.finish("stop")
    assert (rest, finish) == ("", "tool_calls") and calls
    forced = ToolStream(plan(tools=[WEATHER], tool_choice="required"))
    forced.feed('{"name": "wea')
    assert forced.finish("length") == ('{"name": "wea', [], "length")


def test_tool_prompt_joins_the_system_message():
    out = with_tool_prompt([{"role": "system", "content": "Be brief."}, *MSGS], [WEATHER])
    assert len(out) == 2 and out[0]["content"].startswith("Be brief.")
    assert '"weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert with_tool_prompt(MSGS, [WEATHER])[0]["role"] == "system"
