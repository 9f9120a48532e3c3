"""Structured output over HTTP with the official openai client: parse() into pydantic models,
many sampled answers that all validate, regex/choice/grammar extras, mixed traffic, bad schemas
(400, server stays ready), length finishes, streaming."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL_NAME, assert_error_shape

MSGS = [{"role": "user", "content": "Answer in JSON."}]


class Item(BaseModel):
    name: str = Field(max_length=8)
    qty: int = Field(ge=0, le=99)


class Order(BaseModel):  # nested objects, an array, an enum, a boolean
    kind: Literal["buy", "sell"]
    items: list[Item] = Field(max_length=3)
    urgent: bool


class Reading(BaseModel):  # bounded numbers
    celsius: float = Field(ge=-50, le=60)
    humidity: int = Field(ge=0, le=100)


class Profile(BaseModel):  # enums, optional, a string array
    level: Literal["low", "mid", "high"]
    tags: list[Literal["a", "b", "c"]] = Field(min_length=1, max_length=4)
    nick: str | None = Field(max_length=6)


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)


class Path(BaseModel):  # objects in objects
    start: Point
    end: Point
    label: str = Field(max_length=5)


SCHEMAS = [Order, Reading, Profile, Point, Path]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def json_schema_format(model: type[BaseModel]) -> dict:
    return {"type": "json_schema", "json_schema": {
        "name": model.__name__, "schema": model.model_json_schema(), "strict": True}}


def test_parse_returns_a_pydantic_object(client):
    done = client.chat.completions.parse(model=MODEL_NAME, messages=MSGS, response_format=Order,
                                         max_completion_tokens=300, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Order)
    assert choice.message.parsed == Order.model_validate_json(choice.message.content)


def test_fifty_sampled_answers_all_validate(client):
    answers = []
    for k, model in enumerate(SCHEMAS):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=MSGS, response_format=json_schema_format(model), n=10,
            temperature=1.0, seed=k, max_completion_tokens=300)
        for c in resp.choices:
            assert c.finish_reason == "stop", c.message.content
            answers.append(model.model_validate_json(c.message.content))
    assert len(answers) == 50
    assert len({a.model_dump_json() for a in answers}) > 25  # sampled, not one forced answer


def test_completions_regex_choice_grammar_and_json_object(client):
    def complete(**extra):
        return client.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=60,
                                         temperature=1.0, seed=1, n=4, extra_body=extra).choices
    for c in complete(guided_regex=r"[A-Z]{3}-\d{2}"):
        assert re.fullmatch(r"[A-Z]{3}-\d{2}", c.text) and c.finish_reason == "stop"
    for c in complete(guided_choice=["alpha", "beta", "gamma"]):
        assert c.text in ("alpha", "beta", "gamma") and c.finish_reason == "stop"
    for c in complete(guided_grammar='root ::= "<" [xy]{2,3} ">"'):
        assert re.fullmatch(r"<[xy]{2,3}>", c.text)
    for c in complete(structured_outputs={"regex": "[01]{4}"}):
        assert re.fullmatch(r"[01]{4}", c.text)
    for c in complete(guided_json=Point.model_json_schema()):
        Point.model_validate_json(c.text)
    resp = client.completions.create(model=MODEL_NAME, prompt="JSON:", max_tokens=40,
                                     temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
    assert resp.choices[0].text.startswith("{")


def test_unconstrained_requests_unchanged_by_constrained_neighbours(client):
    def plain():
        return client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=24,
                                         temperature=0.8, seed=11).choices[0].text

    def constrained(i):
        return client.chat.completions.create(
            model=MODEL_NAME, messages=MSGS, response_format=json_schema_format(Path),
            temperature=1.0, seed=i, max_completion_tokens=200).choices[0].message.content
    alone = plain()
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(constrained, i) for i in range(4)]
        mixed = [pool.submit(plain) for _ in range(2)]
        assert [f.result() for f in mixed] == [alone, alone]
        for f in others:
            Path.model_validate_json(f.result())


def test_bad_schema_is_a_fast_400_and_the_server_stays_ready(server, client):
    url = server.base_url + "/v1/chat/completions"
    bad = {"model": MODEL_NAME, "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "strnig"}}}}}}
    for _ in range(2):  # the second answer comes from the cache of failures
        t0 = time.monotonic()
        resp = httpx.post(url, json=bad, timeout=30)
        body = assert_error_shape(resp, 400, param="response_format")
        assert time.monotonic() - t0 < 5
        assert "strnig" in body["message"]
    resp = httpx.post(server.base_url + "/v1/completions", timeout=30, json={
        "model": MODEL_NAME, "prompt": "x", "guided_grammar": 'root ::= "a" | bee'})
    msg = assert_error_shape(resp, 400, param="response_format")["message"]
    assert msg.startswith("invalid grammar constraint:") and '"bee"' in msg, msg
    assert httpx.get(server.base_url + "/ready", timeout=5).status_code == 200
    ok = client.chat.completions.parse(model=MODEL_NAME, messages=MSGS, response_format=Point,
                                       max_completion_tokens=100, temperature=0)
    assert isinstance(ok.choices[0].message.parsed, Point)
    server.wait_idle()
    server.assert_no_blocks_held()


def test_max_tokens_first_gives_length(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=4,
                                          temperature=0, response_format=json_schema_format(Order))
    assert resp.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL_NAME, messages=MSGS, response_format=Order,
                                      max_completion_tokens=4, temperature=0)


def test_streamed_answer_validates(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MSGS, stream=True, temperature=0, max_completion_tokens=300,
        response_format=json_schema_format(Profile))
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    Profile.model_validate(json.loads(text))


def test_tgi_grammar_json_and_regex(server):
    url = server.base_url + "/generate"
    body = {"inputs": "A point:", "parameters": {"max_new_tokens": 60, "grammar": {
        "type": "json", "value": Point.model_json_schema()}}}
    out = httpx.post(url, json=body, timeout=60).json()
    Point.model_validate_json(out["generated_text"])
    body["parameters"]["grammar"] = {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}
    out = httpx.post(url, json=body, timeout=60).json()
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", out["generated_text"])
    for bad in ({"type": "xml", "value": "x"}, {"type": "regex", "value": "(unclosed"}):
        body["parameters"]["grammar"] = bad
        assert_error_shape(httpx.post(url, json=body, timeout=60), 400,
                           param="parameters.grammar")
