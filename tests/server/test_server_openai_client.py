"""The official openai client (sync and async, streaming and not) against a live server;
greedy output through HTTP equals the offline LLM's."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from turbollm import LLM, SamplingParams

from conftest import ENGINE_KWARGS, MODEL_NAME

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(model=str(tiny_llama), **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_greedy_equals_offline(client, offline):
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    for prompt, exp in zip(PROMPTS, expected):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                         temperature=0)
        choice = resp.choices[0]
        assert choice.text == exp.outputs[0].text
        assert choice.finish_reason == exp.outputs[0].finish_reason
        assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert resp.usage.completion_tokens == len(exp.outputs[0].token_ids)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_prompt_list_and_token_ids(client, offline):
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=8,
                                     temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [e.outputs[0].text for e in expected]
    ids = list(expected[0].prompt_token_ids)
    resp = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert resp.choices[0].text == expected[0].outputs[0].text


def test_chat_greedy_equals_offline(client, offline):
    exp = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=20))[0]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=20,
                                          temperature=0)
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == exp.outputs[0].text
    assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert resp.usage.completion_tokens == len(exp.outputs[0].token_ids)
    # max_completion_tokens is the newer name of max_tokens
    resp2 = client.chat.completions.create(model=MODEL_NAME, messages=CHAT,
                                           max_completion_tokens=20, temperature=0)
    assert resp2.choices[0].message.content == exp.outputs[0].text


def test_completion_stream_with_usage(client, offline):
    exp = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16))[0]
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == exp.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_stream(client, offline):
    exp = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))[0]
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    # the first chunk is sent with the first token (true TTFT for clients that time it); a
    # slow reader may get it coalesced with the next ones
    first = offline.tokenizer.decode(exp.outputs[0].token_ids[:1])
    assert first and chunks[0].choices[0].delta.content.startswith(first)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(exp.prompt_token_ids) + 12


def test_async_client_stream_and_not(server, offline):
    exp = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    exp_chat = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x",
                                     max_retries=0)
        async with aclient:
            async def one_stream(prompt):
                stream = await aclient.completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            async def chat_whole():
                r = await aclient.chat.completions.create(
                    model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0)
                return r.choices[0].message.content

            async def chat_stream():
                s = await aclient.chat.completions.create(
                    model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in s])

            return await asyncio.gather(*(one_stream(p) for p in PROMPTS), chat_whole(),
                                        chat_stream())

    texts = asyncio.run(main())
    assert texts[:2] == [e.outputs[0].text for e in exp]
    assert texts[2] == texts[3] == exp_chat.outputs[0].text


def test_sampling_options_n_seed_logprobs(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0.8, top_p=0.9,
              seed=1234, n=3, logprobs=2, presence_penalty=0.5, frequency_penalty=0.3,
              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert a.usage.completion_tokens == 18


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy: the top one


def test_echo_and_stop(client, offline):
    exp = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0]
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0, echo=True)
    assert resp.choices[0].text == PROMPTS[0] + exp.outputs[0].text
    full = exp.outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[:full.index(stop)]
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    """The lm-evaluation-harness loglikelihood request: echo + logprobs + max_tokens=1."""
    ids = list(offline.generate(PROMPTS[1], SamplingParams(max_tokens=1))[0].prompt_token_ids)
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=1,
                                     temperature=0, echo=True, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = offline.engine.score_logits(ids).log_softmax(dim=-1)
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4)
        assert len(lp.top_logprobs[p]) <= 2
    assert "".join(lp.tokens[:len(ids)]) == PROMPTS[1]
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert lp.text_offset[len(ids)] == len(PROMPTS[1])  # the completion starts after the echo
    greedy = max(lp.top_logprobs[-1].values())
    assert lp.token_logprobs[-1] == pytest.approx(greedy)
    # Streaming: the echo chunk carries the prompt's logprobs, then the completion's follow.
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=3,
                                            temperature=0, echo=True, logprobs=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPTS[1]
    assert first.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)],
                                                              abs=1e-5)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    assert len(streamed) == len(ids) + 3


def test_user_field_and_unknown_fields_accepted(client):
    resp = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, user="u-1",
                                     extra_body={"some_future_field": {"x": 1}})
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_tgi_generate(server, offline):
    exp = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))[0]
    r = httpx.post(server.base_url + "/generate", json={
        "inputs": PROMPTS[0], "parameters": {"max_new_tokens": 10, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == exp.outputs[0].text
    assert body["details"]["generated_tokens"] == 10
    assert body["details"]["finish_reason"] == "length"
    r = httpx.post(server.base_url + "/generate", json={
        "inputs": PROMPTS[0], "parameters": {"max_new_tokens": 10, "return_full_text": True}})
    assert r.json()["generated_text"] == PROMPTS[0] + exp.outputs[0].text
    r = httpx.post(server.base_url + "/generate", json={
        "inputs": PROMPTS[0], "parameters": {"max_new_tokens": 5, "do_sample": True,
                                             "temperature": 0.7, "top_p": 0.9, "seed": 3}})
    assert r.status_code == 200 and isinstance(r.json()["generated_text"], str)


def test_tgi_generate_stream(server, offline):
    import json
    exp = offline.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))[0]
    with httpx.stream("POST", server.base_url + "/generate_stream", json={
            "inputs": PROMPTS[1], "parameters": {"max_new_tokens": 8}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == exp.outputs[0].text
    assert events[-1]["generated_text"] == exp.outputs[0].text
    assert events[-1]["details"]["finish_reason"] == "length"
    assert all(e["generated_text"] is None for e in events[:-1])
