"""A seeded sampling request's text depends on its seed alone (issue 31): alone or inside mixed
batches of any size and make-up, with chunked prefill, speculative decoding and preemption, on
the bundled Q4_1 model, whose kernels otherwise differ by row count (int16 rows, AMX tiles,
widened GEMMs). KernelConfig.batch_invariant = "seeded", the default."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from turbollm import LLM, SamplingParams
from turbollm.layers import prefill_gemm
from turbollm.models import native_decode
from turbollm.worker.model_runner import ModelRunner

pytestmark = pytest.mark.slow

SEEDED = [  # (prompt, params): a short prompt, a long one (chunked beside decodes), top_p
    ("Once upon a time, in a quiet village,",
     SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)),
    ("The history of the lighthouse keeper " * 20,
     SamplingParams(max_tokens=16, temperature=0.9, seed=4242, ignore_eos=True)),
    ("List three colors:",
     SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, seed=123, ignore_eos=True)),
]


def noise(n: int, seed: int):
    """Greedy and unseeded sampling neighbours with prompts of 1-60 tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True,
                             temperature=rng.choice([0.0, 0.7, 1.0]),
                             top_k=rng.choice([0, 40])) for _ in range(n)]
    return prompts, params


def run_mixed(llm, n_noise: int, seed: int):
    """The seeded requests spread among n_noise others; their token ids."""
    prompts, params = noise(n_noise, seed)
    at = sorted(random.Random(seed).sample(range(n_noise + len(SEEDED)), len(SEEDED)))
    for pos, (p, sp) in zip(at, SEEDED):
        prompts.insert(pos, p)
        params.insert(pos, sp)
    outs = llm.generate(prompts, params)
    return [outs[pos].outputs[0].token_ids for pos in at]


def alone(llm):
    return [llm.generate([p], sp)[0].outputs[0].token_ids for p, sp in SEEDED]


@pytest.fixture(scope="module")
def llm(bundled_gguf):
    return LLM(str(bundled_gguf), kv_cache_memory="96MiB", max_num_seqs=64)


@pytest.fixture(scope="module")
def expected(llm):
    found = alone(llm)
    assert len({tuple(t) for t in found}) == len(SEEDED)
    return found


def test_seeded_text_is_the_same_in_any_batch(llm, expected, monkeypatch):
    steps = []  # (rows, took the C path, row-invariant) of each decoder forward
    forward = native_decode.NativeDecoder.forward

    def spy(self, input_ids, *args):
        out = forward(self, input_ids, *args)
        steps.append((input_ids.shape[0], out is not None, prefill_gemm.is_row_invariant()))
        return out

    monkeypatch.setattr(native_decode.NativeDecoder, "forward", spy)
    for n_noise, seed in ((5, 0), (20, 1)):
        assert run_mixed(llm, n_noise, seed) == expected, n_noise
    # the path: prompt-sized invariant steps ran as C row steps, beyond the few-row limits
    assert any(T > native_decode.MAX_ROWS and ran and inv for T, ran, inv in steps)
    assert all(ran for T, ran, inv in steps if inv)


def test_seeded_text_survives_preemption(expected, bundled_gguf):
    small = LLM(str(bundled_gguf), num_gpu_blocks_override=16, max_num_seqs=64)
    assert run_mixed(small, 10, 3) == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_seeded_text_with_speculation_is_the_same_in_any_batch(bundled_gguf):
    """Random verification draws other numbers than plain sampling, so the text differs from
    the one without speculation; with it, it still depends on the seed alone."""
    spec = LLM(str(bundled_gguf), kv_cache_memory="96MiB", speculative_method="ngram")
    assert run_mixed(spec, 10, 4) == alone(spec)
    assert spec.engine.spec.num_spec_steps > 0


def test_which_steps_are_invariant():
    def step(*params):
        return [SimpleNamespace(params=p) for p in params]
    greedy, free = SamplingParams(temperature=0), SamplingParams(temperature=0.8)
    seeded, seeded_greedy = SamplingParams(temperature=0.8, seed=1), SamplingParams(seed=1,
                                                                                  temperature=0)
    runner = ModelRunner.__new__(ModelRunner)
    for mode, cases in (("seeded", [((greedy, free), False), ((greedy, seeded), True),
                                     ((seeded_greedy,), False)]),
                        ("all", [((greedy,), True), ((free,), True)]),
                        ("off", [((seeded,), False)])):
        runner.batch_invariant = mode
        for params, expected in cases:
            assert runner._invariant_step(step(*params)) == expected, (mode, params)
