"""Tool calling over HTTP with the official openai client (tiny random model, so forced calls
show the grammar at work and "auto" shows the plain path): required and named choices, streamed
and not, n > 1, tool results flowing back into the next turn."""
from __future__ import annotations

import json

import openai
import pytest

from conftest import MODEL_NAME

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {
    "name": "clock", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def check_weather_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    assert isinstance(args["city"], str) and len(args["city"]) <= 10


def test_required_gives_a_valid_call_for_every_choice(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, tools=[WEATHER],
                                          tool_choice="required", n=3, temperature=1.0, seed=2,
                                          max_tokens=200)
    for c in resp.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1
        check_weather_call(c.message.tool_calls[0])


def test_named_function_is_the_one_called(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MSGS, tools=[WEATHER, CLOCK], temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "clock"}})
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "clock"
    assert json.loads(call.function.arguments)["tz"] in ("UTC", "CET")


def test_streamed_required_call(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, tools=[WEATHER],
                                            tool_choice="required", temperature=0,
                                            max_tokens=200, stream=True)
    name, args, finish, content = "", "", None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and name == "weather" and content == ""
    assert json.loads(args)["unit"] in ("C", "F")


def test_auto_without_a_call_is_plain_content(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, tools=[WEATHER],
                                          temperature=0, max_tokens=12)
    c = resp.choices[0]
    assert c.message.tool_calls is None and c.message.content
    assert c.finish_reason in ("stop", "length")


def test_tool_results_flow_into_the_next_turn(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, tools=[WEATHER],
                                           tool_choice="required", temperature=0,
                                           max_tokens=200)
    msg = first.choices[0].message
    history = MSGS + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                       "content": '{"temp": 21}'}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=[WEATHER],
                                            temperature=0, max_tokens=8)
    # the call and its result are part of the prompt now
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert second.choices[0].message.content is not None
