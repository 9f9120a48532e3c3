"""POST /v1/embeddings with the official openai client (which asks for base64 by default):
the same vectors as the engine's embed, float and base64, token-id inputs, bad input -> 400."""
from __future__ import annotations

import httpx
import openai
import pytest

from conftest import MODEL_NAME, assert_error_shape


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_vectors_match_the_engine_in_both_encodings(server, client):
    texts = ["Hello world", "A longer sentence about the weather in Paris."]
    resp = client.embeddings.create(model=MODEL_NAME, input=texts)  # base64 on the wire
    floats = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    engine = server.llm_engine
    for i, text in enumerate(texts):
        expected = engine.embed(engine.encode_prompt(text))  # read-only: fine off-thread here
        assert resp.data[i].index == i and len(resp.data[i].embedding) == 64
        assert resp.data[i].embedding == pytest.approx(expected, abs=1e-6)
        assert floats.data[i].embedding == pytest.approx(expected, abs=1e-6)
    assert resp.usage.prompt_tokens == sum(len(engine.encode_prompt(t)) for t in texts)
    ids = engine.encode_prompt(texts[0])
    by_ids = client.embeddings.create(model=MODEL_NAME, input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_pooling_extension_changes_the_vector(server):
    body = {"model": MODEL_NAME, "input": "Hello world", "encoding_format": "float"}
    mean = httpx.post(server.base_url + "/v1/embeddings", json=body).json()
    last = httpx.post(server.base_url + "/v1/embeddings", json={**body, "pooling": "last"}).json()
    assert mean["data"][0]["embedding"] != last["data"][0]["embedding"]


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": [[1, 10**7]]}, "input"),  # a token id the vocabulary does not have
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
])
def test_bad_input_is_a_400(server, body, param):
    r = httpx.post(server.base_url + "/v1/embeddings", json={"model": MODEL_NAME, **body})
    assert_error_shape(r, 400, param=param)
