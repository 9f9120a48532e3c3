"""POST /v1/responses with the official openai client: create, stream (the event sequence and
the SDK's stream helper), previous_response_id chaining, tools, text.format, the bounded store
(GET, DELETE, eviction, store=false), and bad input."""
from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from conftest import MODEL_NAME, assert_error_shape
from turbollm.server.config import ServerConfig

WEATHER = {"type": "function", "name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_create_answers_like_chat_with_the_same_messages(client):
    resp = client.responses.create(model=MODEL_NAME, instructions="Be brief.", input="Hello",
                                   temperature=0, max_output_tokens=12)
    chat = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=12,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert resp.object == "response" and resp.output[0].type == "message"
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    finish = chat.choices[0].finish_reason
    assert resp.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert resp.incomplete_details.reason == "max_output_tokens"


def test_stream_sends_the_official_event_sequence(client):
    events = list(client.responses.create(model=MODEL_NAME, input="Count", temperature=0,
                                          max_output_tokens=10, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    plain = client.responses.create(model=MODEL_NAME, input="Count", temperature=0,
                                    max_output_tokens=10)
    assert deltas == plain.output_text == events[-1].response.output_text
    assert events[-1].response.status == (
        "incomplete" if kinds[-1] == "response.incomplete" else "completed")


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]


def test_sdk_stream_helper_gets_the_final_parsed_response(client):
    # a grammar that ends soon, so the answer completes (an incomplete one ends the stream with
    # response.incomplete, after which the SDK has no final response, as with OpenAI)
    with client.responses.stream(model=MODEL_NAME, input="Yes or no?", text_format=Verdict,
                                 temperature=0, max_output_tokens=40) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and text == final.output_text
    assert isinstance(final.output_parsed, Verdict)


def test_previous_response_id_chains_the_conversation(client):
    first = client.responses.create(model=MODEL_NAME, input="My name is Ada.", temperature=0,
                                    max_output_tokens=6)
    second = client.responses.create(model=MODEL_NAME, input="What is my name?", temperature=0,
                                     max_output_tokens=6, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    chat = client.chat.completions.create(model=MODEL_NAME, temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_forced_tool_call_and_its_output_in_the_next_turn(client):
    resp = client.responses.create(model=MODEL_NAME, input="Weather in Oslo?", tools=[WEATHER],
                                   tool_choice="required", temperature=0, max_output_tokens=60)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "weather" and resp.status == "completed"
    assert set(json.loads(calls[0].arguments)) == {"city"}
    follow = client.responses.create(
        model=MODEL_NAME, previous_response_id=resp.id, temperature=0, max_output_tokens=4,
        tools=[WEATHER],  # tools are per request, as with OpenAI: not carried by the chain
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"}])
    assert follow.usage.input_tokens > resp.usage.input_tokens + resp.usage.output_tokens
    events = list(client.responses.create(model=MODEL_NAME, input="Weather in Oslo?",
                                          tools=[WEATHER], tool_choice="required",
                                          temperature=0, max_output_tokens=60, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [d.type for d in done] == ["function_call"]
    assert done[0].arguments == calls[0].arguments


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10**9)


def test_text_format_json_schema_parses(client):
    resp = client.responses.parse(model=MODEL_NAME, input="A city, as JSON", text_format=City,
                                  temperature=0, max_output_tokens=80)
    assert isinstance(resp.output_parsed, City)


def test_store_get_delete_and_store_false(client):
    resp = client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=2)
    assert client.responses.retrieve(resp.id).id == resp.id
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    kept_not = client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=2,
                                       store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept_not.id)


def test_store_drops_the_least_recently_used(make_server_fixture):
    live = make_server_fixture(ServerConfig(port=0, responses_store_size=2))
    c = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)
    ids = [c.responses.create(model=MODEL_NAME, input=f"turn {i}", max_output_tokens=2).id
           for i in range(3)]
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(ids[0])
    r = httpx.post(live.base_url + "/v1/responses", json={
        "model": MODEL_NAME, "input": "again", "previous_response_id": ids[0]})
    assert_error_shape(r, 404, "previous_response_not_found", "previous_response_id")
    assert c.responses.retrieve(ids[2]).id == ids[2]


@pytest.mark.parametrize("body,param", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                         "schema": {"type": "nope"}}}}, None),
])
def test_bad_input_is_a_400(server, body, param):
    r = httpx.post(server.base_url + "/v1/responses", json={"model": MODEL_NAME, **body})
    assert_error_shape(r, 400, param=param)
    assert httpx.get(server.base_url + "/ready").status_code == 200
