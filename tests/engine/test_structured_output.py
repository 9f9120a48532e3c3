"""Constrained decoding through the engine on a tiny random Llama (whose unconstrained output is
noise, so a valid answer shows the mask was applied): schemas, regex, choice, grammars; finish
reasons; mixed batches; preemption; compiles off the loop; bad specs; beside speculative decoding."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from turbollm import LLM, SamplingParams, StructuredOutputSpec as Spec
from turbollm.engine.errors import RequestValidationError


class Item(BaseModel):
    name: str = Field(max_length=8)
    qty: int = Field(ge=0, le=99)


class Order(BaseModel):
    kind: Literal["buy", "sell"]
    items: list[Item] = Field(max_length=3)
    urgent: bool
    note: str | None = Field(default=None, max_length=10)


SCHEMA = Order.model_json_schema()
PROMPTS = ["Write an order as JSON:", "Order:", "1 2 3", "The weather today is"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB", block_size=16,
               max_num_seqs=64, max_num_batched_tokens=256)


def sampled(n, **kw):
    """n sampling settings: greedy first, then seeded random ones."""
    return [SamplingParams(temperature=0 if i == 0 else 1.0, seed=None if i == 0 else i, **kw)
            for i in range(n)]


def test_json_schema_answers_validate(llm):
    params = sampled(8, max_tokens=300, structured_output=Spec.json(SCHEMA))
    outs = llm.generate([PROMPTS[i % 4] for i in range(8)], params)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        Order.model_validate_json(c.text)  # raises if invalid
    assert len({o.outputs[0].text for o in outs}) > 3  # really sampled, not one forced string


def test_regex_choice_grammar_and_json_object(llm):
    cases = [(Spec.regex(r"[A-Z]{2}-\d{3}"), lambda t: re.fullmatch(r"[A-Z]{2}-\d{3}", t)),
             (Spec.choice(["red", "green", 'say "blue"']), lambda t: t in
              ("red", "green", 'say "blue"')),
             (Spec.grammar('root ::= "(" [a-c]{1,4} ")"'), lambda t: re.fullmatch(r"\([a-c]{1,4}\)", t))]
    for spec, ok in cases:
        outs = llm.generate(PROMPTS, sampled(4, max_tokens=100, structured_output=spec))
        for o in outs:
            assert o.outputs[0].finish_reason == "stop" and ok(o.outputs[0].text), o.outputs[0].text
    # Any JSON object: a random model rambles inside unbounded keys, so it may run out of tokens;
    # what it wrote is an object's beginning, and a finished one parses.
    outs = llm.generate(PROMPTS, sampled(4, max_tokens=40, structured_output=Spec.json_object()))
    for o in outs:
        c = o.outputs[0]
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_long_prompt_is_chunked_then_constrained(llm):
    # 256-token step budget: the prompt takes several steps, and only its last one samples
    long_prompt = list(range(100, 500))  # 400 tokens: two chunks
    out = llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=100,
                                                     structured_output=Spec.regex(r"[a-f]{6}")))
    assert re.fullmatch(r"[a-f]{6}", out[0].outputs[0].text)


def test_max_tokens_first_is_length_not_a_truncated_answer(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3,
                                                  structured_output=Spec.json(SCHEMA)))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(out.outputs[0].text)


def test_unconstrained_neighbours_are_token_for_token_unchanged(llm):
    plain = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=20, ignore_eos=True)]
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], plain)]
    constrained = sampled(3, max_tokens=60, structured_output=Spec.regex(r"[a-z ]{5,40}"))
    mixed = llm.generate(PROMPTS[:3] + PROMPTS[:3], plain + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert all(re.fullmatch(r"[a-z ]{5,40}", o.outputs[0].text) for o in mixed[3:])


def test_masks_filled_and_tokens_accepted_only_for_constrained(llm, monkeypatch):
    seen = []
    real = llm.engine.constrained.fill_bitmasks

    def spy(so, batch):
        real(so, batch)
        seen.extend((r.grammar, w.grammar_bitmask is not None) for r, w in
                    zip(so.requests, batch.sequences) if w.sample)
    monkeypatch.setattr(llm.engine.constrained, "fill_bitmasks", spy)
    outs = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=8),
                                      SamplingParams(temperature=0, max_tokens=50,
                                                     structured_output=Spec.regex(r"\d{4}"))])
    assert all((g is not None) == has for g, has in seen)
    states = {g for g, _ in seen if g is not None}
    assert len(states) == 1
    (state,) = states
    # one mask per sampled token (the 4 digits and the stop token), each token accepted
    assert state.num_masks == state.num_accepted == len(outs[1].outputs[0].token_ids) == 5


def test_preemption_keeps_the_grammar_state(llm, tiny_llama):
    prompts = [p * 3 for p in PROMPTS] * 2
    params = [SamplingParams(temperature=0, max_tokens=200,
                             structured_output=Spec.json(SCHEMA))] * len(prompts)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params)]
    small = LLM(str(tiny_llama), dtype="float32", block_size=16, max_num_seqs=64,
                max_num_batched_tokens=128, num_gpu_blocks_override=16)
    got = [o.outputs[0].text for o in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    for t in got:
        Order.model_validate_json(t)


def test_compiling_grammar_waits_without_stalling_others(llm, monkeypatch):
    manager = llm.engine.constrained.manager
    pending: Future = Future()
    real = manager.compile
    slow = Spec.regex(r"slow[0-9]")
    monkeypatch.setattr(manager, "compile", lambda s: pending if s == slow else real(s))
    eng = llm.engine
    eng.add_request("slow", PROMPTS[0], SamplingParams(temperature=0, max_tokens=20,
                                                       structured_output=slow))
    eng.add_request("fast", PROMPTS[1], SamplingParams(temperature=0, max_tokens=5))
    done = {}
    for _ in range(20):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert "fast" in done and "slow" not in done
    assert "slow" in eng.waiting_request_ids()  # waiting, not scheduled
    pending.set_result(real(slow).result())
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert re.fullmatch(r"slow[0-9]", done["slow"].outputs[0].text)


def test_bad_specs_fail_with_the_parsers_message(llm, monkeypatch):
    with pytest.raises(RequestValidationError, match="(?i)parenthesis"):
        llm.generate(PROMPTS[0], SamplingParams(structured_output=Spec.regex("((")))
    with pytest.raises(RequestValidationError, match="undefined_rule"):
        llm.generate(PROMPTS[0], SamplingParams(structured_output=Spec.grammar(
            "root ::= undefined_rule")))
    # a grammar that fails later, in the background: that request fails, the other runs
    eng = llm.engine
    manager = eng.constrained.manager
    failing: Future = Future()
    bad = Spec.regex("late-failure")
    real = manager.compile
    monkeypatch.setattr(manager, "compile", lambda s: failing if s == bad else real(s))
    eng.add_request("bad", PROMPTS[0], SamplingParams(structured_output=bad))
    eng.add_request("ok", PROMPTS[1], SamplingParams(temperature=0, max_tokens=4))
    failing.set_exception(ValueError("no good"))
    outs = {o.request_id: o for o in eng.step() + eng.run_until_done()}
    assert outs["bad"].error == "invalid regex constraint: no good"
    assert outs["ok"].error is None and len(outs["ok"].outputs[0].token_ids) == 4


def test_speculative_engine_decodes_constrained_requests_plainly(llm, tiny_llama):
    """Constrained requests get no proposals (drafted tokens would skip the mask); the same
    greedy answers as without speculation, while their unconstrained neighbours speculate."""
    spec_llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB", block_size=16,
                   max_num_seqs=64, max_num_batched_tokens=256, speculative_method="ngram")
    constrained = [SamplingParams(temperature=0, max_tokens=300, structured_output=spec)
                   for spec in (Spec.json(SCHEMA), Spec.regex(r"[a-z]{2,5}-[0-9]{2}"))]
    # a prompt that repeats itself: n-gram lookup proposes, and greedy copies it
    loop = "a b c d e f g a b c d e f g a b c d e f g a b c d"
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = PROMPTS[:2] + [loop]
    want = [o.outputs[0].text for o in llm.generate(prompts, constrained + [plain])]
    spec = spec_llm.engine.spec
    outs = spec_llm.generate(prompts, constrained + [plain])
    assert [o.outputs[0].text for o in outs] == want
    Order.model_validate_json(outs[0].outputs[0].text)
    assert outs[0].metrics.spec_draft_tokens == outs[1].metrics.spec_draft_tokens == 0
    assert spec.num_draft_tokens > 0  # the unconstrained request did speculate


def test_llguidance_backend_gives_the_same_answers(llm, tiny_llama):
    other = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", block_size=16,
                structured_output_backend="llguidance")
    assert other.engine.config.scheduler.structured_output_backend == "llguidance"
    params = [SamplingParams(temperature=0, max_tokens=300, structured_output=spec)
              # [0-9], not \d: llguidance's \d takes any Unicode digit, xgrammar's ASCII only
              for spec in (Spec.json(SCHEMA), Spec.regex(r"[a-z]{2,5}-[0-9]{2}"),
                           Spec.choice(["alpha", "beta"]))]
    want = [o.outputs[0].text for o in llm.generate(PROMPTS[:3], params)]
    got = [o.outputs[0].text for o in other.generate(PROMPTS[:3], params)]
    assert other.engine.constrained.manager.backend_name == "llguidance"
    # The regex and the choice allow the same tokens in both: the same greedy answers. The
    # schema's optional "note" is where they differ (xgrammar lets the model open it here,
    # llguidance closes the object), so that answer is checked for validity only.
    assert got[1:] == want[1:]
    for text in (got[0], want[0]):
        Order.model_validate_json(text)
