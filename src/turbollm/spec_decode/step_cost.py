"""What a step verifying k proposals costs, in plain decode steps: measured at start-up.

On a memory-bound device one more verified row is nearly free (a dense bf16 target here:
~0.02-0.2 of a step per row); on this 2-core CPU the low-bit kernels are bound by compute
(each row's int16 dot products), so the first extra row costs ~0.25-0.5 of a Q4_1 step and
the next ones ~0.35-0.6 each (row counts take different kernel paths). No constant fits all
of these, so the engine times its own steps: one probe request decodes with k = 0, 1, 2, 4,
..., max_k forced proposals, interleaved, and the median step time per k over the plain one
gives the table; k in between are interpolated.
"""
from __future__ import annotations

import statistics
import time

from turbollm.sampling_params import SamplingParams

PROBE_ID = "__turbollm_step_cost_probe__"
PROBE_CONTEXT = 256  # prompt tokens of the probe: a short chat turn's context
PROBE_ROUNDS = 3


def linear_costs(max_k: int, per_token: float) -> list[float]:
    """costs[k] = 1 + k * per_token: a fixed price per verified proposal."""
    return [1.0 + k * per_token for k in range(max_k + 1)]


def probe_ks(max_k: int) -> list[int]:
    """0, 1, 2, 4, ... and max_k: the row counts that are timed."""
    ks, k = [0], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


def interpolate(measured: dict[int, float], max_k: int) -> list[float]:
    """costs[k] for k = 0..max_k from measured points, linear in between and never decreasing
    (a noisy point must not make more proposals look cheaper than fewer)."""
    ks = sorted(measured)
    out = []
    for k in range(max_k + 1):
        hi = next(j for j in ks if j >= k)
        lo = max(j for j in ks if j <= k)
        w = 0.0 if hi == lo else (k - lo) / (hi - lo)
        out.append((1 - w) * measured[lo] + w * measured[hi])
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1])
    return out


def measure_step_costs(engine, max_k: int, rounds: int = PROBE_ROUNDS) -> list[float] | None:
    """Time the engine's own decode steps with k forced proposals (see the module docstring).
    None when a probe does not fit (a tiny KV cache or context): the caller keeps a constant."""
    ks = probe_ks(max_k)
    tokens_needed = rounds * sum(k + 1 for k in ks) + max_k + 1
    context = min(PROBE_CONTEXT, engine.max_model_len - tokens_needed)
    block_size = engine.config.cache.block_size
    blocks = -(-(context + tokens_needed) // block_size)
    if context < 8 or blocks > engine.kv_manager.pool.num_available:
        return None
    # any tokens will do: the cost of a step does not depend on which tokens it verifies
    prompt = [(7 * i + 11) % engine.arch.vocab_size for i in range(context)]
    params = SamplingParams(max_tokens=tokens_needed, temperature=0.0, ignore_eos=True)
    times: dict[int, list[float]] = {k: [] for k in ks}
    engine.add_request(PROBE_ID, prompt, params)
    try:
        while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        req = engine.scheduler.running[0]
        for rnd in range(rounds):
            for k in (ks if rnd % 2 == 0 else ks[::-1]):
                req.spec_token_ids = req.all_token_ids[-k:] if k else []
                t0 = time.perf_counter()
                engine.step()
                times[k].append(time.perf_counter() - t0)
    finally:
        engine.abort_request(PROBE_ID)
    plain = statistics.median(times[0])
    return interpolate({k: statistics.median(t) / plain for k, t in times.items()}, max_k)
