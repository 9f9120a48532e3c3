"""The whole estimate for one setup and workload: memory, latency, throughput and cost.

Serving model: `batch` requests arrive together, are prefilled together (TTFT), then decode
together one token per step (TPOT). The machine is assumed busy all the time at that batch,
so its hourly price is shared by the tokens it produces (a continuously-batched server in
steady state at that concurrency behaves about the same).
"""
from __future__ import annotations

from dataclasses import dataclass

from turbollm.plan.latency import PhaseTime, mean_decode_step, prefill_time
from turbollm.plan.memory import MemoryPlan, memory_plan
from turbollm.plan.setup import Setup, Workload


@dataclass(frozen=True)
class ApiPrice:
    """A hosted API's price, in $ per 1M prompt and per 1M completion tokens."""

    prompt_per_m: float
    completion_per_m: float

    def per_request(self, w: Workload) -> float:
        return (w.prompt_len * self.prompt_per_m + w.completion_len * self.completion_per_m) / 1e6


@dataclass(frozen=True)
class Cost:
    """Dollars at the setup's hourly price, with the machine busy at the workload's batch."""

    price_per_hour: float  # all GPUs of the setup
    per_1k_prompt: float  # prefill time's share, per 1K prompt tokens
    per_1k_completion: float  # decode time's share, per 1K completion tokens
    per_request: float
    api_per_request: float | None = None  # the same request at the API's price
    api_ratio: float | None = None  # ours / API (< 1: self-hosting is cheaper)


@dataclass(frozen=True)
class Estimate:
    """Everything `turbollm plan` reports for one setup and workload."""

    setup: Setup
    workload: Workload
    memory: MemoryPlan
    prefill: PhaseTime  # the whole batch's prefill
    decode: PhaseTime  # one decode step, averaged over the completion
    ttft_s: float  # time to first token
    tpot_s: float  # time per output token after the first
    e2e_s: float  # time to the last token
    output_tokens_per_s: float  # completion tokens per second, whole machine
    total_tokens_per_s: float  # prompt + completion tokens per second
    requests_per_s: float
    cost: Cost

    def meets(self, slo: "Slo") -> bool:
        """True when the workload fits in memory and every SLO given is met."""
        return self.memory.fits and slo.met_by(self.ttft_s, self.tpot_s, self.e2e_s)


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds; None means no target."""

    e2e_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_by(self, ttft: float, tpot: float, e2e: float) -> bool:
        """True when each given target is met."""
        pairs = ((self.e2e_s, e2e), (self.ttft_s, ttft), (self.tpot_s, tpot))
        return all(target is None or value <= target for target, value in pairs)

    @property
    def empty(self) -> bool:
        return self.e2e_s is None and self.ttft_s is None and self.tpot_s is None


def _cost(setup: Setup, w: Workload, ttft: float, e2e: float, api: ApiPrice | None) -> Cost:
    per_s = setup.gpu.price_per_hour * setup.n_gpus / 3600
    # prefill time is paid by prompt tokens, decode time by completion tokens
    prompt = per_s * ttft / (w.batch * w.prompt_len) * 1000
    completion = per_s * (e2e - ttft) / (w.batch * w.completion_len) * 1000
    per_request = per_s * e2e / w.batch
    api_req = api.per_request(w) if api else None
    ratio = per_request / api_req if api_req else None
    return Cost(per_s * 3600, prompt, completion, per_request, api_req, ratio)


def estimate(setup: Setup, workload: Workload, api: ApiPrice | None = None,
             context_len: int | None = None) -> Estimate:
    """Memory, latency, throughput and cost of `workload` on `setup`."""
    w = workload
    mem = memory_plan(setup, w, context_len)
    pre = prefill_time(setup, w.batch, w.prompt_len)
    dec = mean_decode_step(setup, w.batch, w.prompt_len, w.completion_len)
    ttft = pre.total_s  # the first token comes out of the prefill pass
    e2e = ttft + (w.completion_len - 1) * dec.total_s
    return Estimate(
        setup=setup, workload=w, memory=mem, prefill=pre, decode=dec,
        ttft_s=ttft, tpot_s=dec.total_s, e2e_s=e2e,
        output_tokens_per_s=w.batch * w.completion_len / e2e,
        total_tokens_per_s=w.batch * w.context_len / e2e,
        requests_per_s=w.batch / e2e,
        cost=_cost(setup, w, ttft, e2e, api),
    )
