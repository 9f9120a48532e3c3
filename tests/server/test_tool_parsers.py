"""server/tool_parsers.py: each family's call format read from finished and streamed answers,
the parser picked from the chat template, special-token markers kept in the answer."""
from __future__ import annotations

import json

import pytest

from turbollm.server.config import ServerConfig
from turbollm.server.params import chat_params
from turbollm.server.protocol import ChatCompletionRequest
from turbollm.server.tool_parsers import PARSERS, detect_parser, make_parser
from turbollm.server.tools import ToolStream, parse_answer, plan_tools

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TIME = {"type": "function", "function": {"name": "time"}}
NAMES = {"weather", "time"}


def calls_of(parser: str, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = PARSERS[parser]().parse(text, NAMES)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in calls]


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Ok.<tool_call>{"name": "time", "arguments": {}}</tool_call>', "Ok.",
     [("time", {})]),
    ("qwen", '<tool_call>\n<function=weather>\n<parameter=city>\nSan José\n</parameter>\n'
             '<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>', None,
     [("weather", {"city": "San José", "days": 3})]),
    ("qwen", '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>', None,
     [("weather", {"city": "Oslo"})]),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Lima"}}', None,
     [("weather", {"city": "Lima"})]),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": {"city": "A"}}; '
                    '{"name": "time", "parameters": {}}', None,
     [("weather", {"city": "A"}), ("time", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Rome"}}, '
                '{"name": "time", "arguments": {}}]', None,
     [("weather", {"city": "Rome"}), ("time", {})]),
    ("mistral", 'Checking. [TOOL_CALLS]weather[ARGS]{"city": "Nice"}[TOOL_CALLS]time[ARGS]{}',
     "Checking.", [("weather", {"city": "Nice"}), ("time", {})]),
    ("mistral", '[TOOL_CALLS]time[CALL_ID]a1b2c3d4e[ARGS]{}', None, [("time", {})]),
])
def test_each_family_reads_its_calls(parser, text, content, calls):
    assert calls_of(parser, text) == (content, calls)


@pytest.mark.parametrize("parser,text", [
    ("hermes", "plain words"), ("hermes", '<tool_call>{"name": "nope", "arguments": {}}'),
    ("qwen", "<tool_call><function=nope><parameter=a>1</parameter></function></tool_call>"),
    ("llama3_json", '{"city": "not a call"}'), ("llama3_json", '{"name": "weather", "para'),
    ("llama3_json", "The answer is 4."),
    ("mistral", "[TOOL_CALLS]not json"), ("mistral", '[TOOL_CALLS]nope[ARGS]{}'),
    ("mistral", "No calls here."),
])
def test_text_that_is_no_valid_call_comes_back_as_content(parser, text):
    assert calls_of(parser, text) == (text, [])


@pytest.mark.parametrize("parser,parts,streamed_content", [
    ("mistral", ["Sure", " [TOOL", '_CALLS]weather[ARGS]{"city": "X"}'], "Sure "),
    ("llama3_json", ["  {", '"name": "time", "parameters": {}}'], ""),
    ("llama3_json", ["Hi", " there <|python", '_tag|>{"name": "time", "parameters": {}}'],
     "Hi there "),
    ("qwen", ["a <tool_", "call><function=time></function></tool_call>"], "a "),
])
def test_streams_hold_back_each_familys_calls(parser, parts, streamed_content):
    plan = plan_tools(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, TIME]}),
        PARSERS[parser]())
    stream = ToolStream(plan)
    assert "".join(stream.feed(p) for p in parts) == streamed_content
    rest, calls, finish = stream.finish("stop")
    assert finish == "tool_calls" and len(calls) == 1 and rest == ""


def test_llama3_text_that_opened_like_json_is_released_at_the_end():
    plan = plan_tools(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [TIME]}),
        PARSERS["llama3_json"]())
    stream = ToolStream(plan)
    assert stream.feed('{"a": 1} is JSON') == ""
    assert stream.finish("stop") == ('{"a": 1} is JSON', [], "stop")


@pytest.mark.parametrize("template,expected", [
    (None, "hermes"), ("{{ messages }}", "hermes"),  # shows no tools: our hermes prompt
    ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]", "mistral"),
    ("{% for tool in tools %}<tools>{{ tool }}</tools>{% endfor %}<tool_call>", "hermes"),
    ("{% if tools %}<function=example>{% endif %}<tool_call>", "qwen"),
    ("{% if tools %}Environment: ipython{% endif %}<|python_tag|>", "llama3_json"),
])
def test_parser_detected_from_the_template(template, expected):
    assert detect_parser(template) == expected
    assert make_parser("auto", template).name == expected
    assert make_parser("mistral", template).name == "mistral"  # an explicit choice wins


def test_bad_parser_name_is_refused():
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="gpt")


def test_special_token_markers_are_kept_in_the_answer():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
    cfg = ServerConfig()
    assert chat_params(req, cfg).skip_special_tokens  # hermes: plain-text markers
    assert not chat_params(req, cfg, PARSERS["mistral"]()).skip_special_tokens
    assert not chat_params(req, cfg, PARSERS["llama3_json"]()).skip_special_tokens
    forced = req.model_copy(update={"tool_choice": "required"})  # the grammar writes the call
    assert chat_params(forced, cfg, PARSERS["mistral"]()).skip_special_tokens
    none = req.model_copy(update={"tool_choice": "none"})
    assert chat_params(none, cfg, PARSERS["mistral"]()).skip_special_tokens
    assert parse_answer(plan_tools(forced, PARSERS["mistral"]()),
                        '{"name": "weather", "arguments": {"city": "B"}}')[1]
