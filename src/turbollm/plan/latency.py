"""Latency: FLOPs and bytes of prefill and decode, roofline time per phase, all-reduce cost.

Every phase takes max(compute time, memory time) -- the roofline -- plus tensor-parallel
all-reduces and a fixed per-forward overhead, which do not overlap with the math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from turbollm.model_arch import ModelArch
from turbollm.plan.memory import kv_bytes_per_token, weight_bytes
from turbollm.plan.setup import Setup
from turbollm.sizing import dtype_bytes


def matmul_params(arch: ModelArch) -> tuple[int, int]:
    """(parameters of all decoder-layer projections, parameters of the output projection)."""
    return arch.num_hidden_layers * arch.linear_params_per_layer(), \
        arch.vocab_size * arch.hidden_size


def attention_flops(arch: ModelArch, context: float) -> float:
    """FLOPs of QK^T and softmax(.)V for one query token attending to `context` tokens."""
    return 4.0 * arch.num_hidden_layers * arch.q_size * context


def flops_per_token(arch: ModelArch, context: float = 0) -> float:
    """Forward FLOPs of one decoded token: 2 per weight (multiply-add) plus attention."""
    layers, head = matmul_params(arch)
    return 2.0 * (layers + head) + attention_flops(arch, context)


def prefill_flops(arch: ModelArch, batch: int, prompt_len: int) -> float:
    """FLOPs to prefill `batch` prompts of `prompt_len` tokens (causal attention;
    logits only for each prompt's last token, as a serving engine computes them)."""
    layers, head = matmul_params(arch)
    tokens = batch * prompt_len
    # token i attends to i tokens: sum_{i=1..P} i = P (P + 1) / 2
    attn = batch * attention_flops(arch, prompt_len * (prompt_len + 1) / 2)
    return 2.0 * layers * tokens + 2.0 * head * batch + attn


def allreduce_time(setup: Setup, nbytes: float) -> float:
    """Seconds of one ring all-reduce of `nbytes` per GPU: 2 (n-1)/n of the data crosses
    each link, plus a fixed latency per call."""
    n = setup.n_gpus
    if n == 1:
        return 0.0
    bw = setup.gpu.interconnect_gbps * 1e9 * setup.efficiency.comm_eff
    return setup.gpu.allreduce_latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / bw


def comm_time(setup: Setup, tokens: int) -> float:
    """All-reduce time of one forward over `tokens` tokens: Megatron-style tensor parallelism
    sums partial outputs twice per layer (after attention and after the MLP)."""
    if setup.n_gpus == 1:
        return 0.0
    act_bytes = tokens * setup.arch.hidden_size * dtype_bytes(setup.precision.dtype)
    return 2 * setup.arch.num_hidden_layers * allreduce_time(setup, act_bytes)


@dataclass(frozen=True)
class PhaseTime:
    """Roofline breakdown of one phase (a prefill, or one decode step)."""

    flops_per_gpu: float
    bytes_per_gpu: float
    compute_s: float  # flops / (peak x MFU)
    memory_s: float  # bytes / (bandwidth x MBU)
    comm_s: float  # tensor-parallel all-reduces
    overhead_s: float  # fixed host-side cost of the forward passes
    total_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def _phase(setup: Setup, flops: float, nbytes: float, comm_s: float, passes: int) -> PhaseTime:
    tp, eff = setup.n_gpus, setup.efficiency
    peak = setup.gpu.peak_flops(setup.precision.compute_dtype(setup.gpu))
    compute = flops / tp / (peak * eff.mfu)
    memory = nbytes / (setup.gpu.bandwidth_gbps * 1e9 * eff.mbu)
    overhead = passes * eff.overhead_s
    return PhaseTime(flops / tp, nbytes, compute, memory, comm_s, overhead,
                     max(compute, memory) + comm_s + overhead)


def prefill_time(setup: Setup, batch: int, prompt_len: int) -> PhaseTime:
    """Time to prefill `batch` prompts together, in chunks of `max_batched_tokens`."""
    a, tp = setup.arch, setup.n_gpus
    tokens = batch * prompt_len
    passes = math.ceil(tokens / setup.max_batched_tokens)
    # each chunk streams the weights once and writes its tokens' K and V
    weights = weight_bytes(a, setup.precision).read_per_step(tp)
    kv = kv_bytes_per_token(a, setup.precision.kv_dtype, tp)
    nbytes = passes * weights + tokens * kv
    return _phase(setup, prefill_flops(a, batch, prompt_len), nbytes,
                  comm_time(setup, tokens), passes)


def decode_step_time(setup: Setup, batch: int, context: float) -> PhaseTime:
    """Time of one decode step: `batch` sequences each add one token after `context`."""
    a, tp = setup.arch, setup.n_gpus
    weights = weight_bytes(a, setup.precision).read_per_step(tp)
    kv = kv_bytes_per_token(a, setup.precision.kv_dtype, tp)
    # every step streams all weights once plus each sequence's whole KV cache
    nbytes = weights + batch * context * kv
    return _phase(setup, batch * flops_per_token(a, context), nbytes,
                  comm_time(setup, batch), 1)


def mean_decode_step(setup: Setup, batch: int, prompt_len: int, completion_len: int,
                     samples: int = 32) -> PhaseTime:
    """Decode step time averaged over the steps of a completion (the context grows from
    prompt_len to prompt_len + completion_len - 2), by the midpoint rule."""
    steps = max(completion_len - 1, 1)
    n = min(steps, samples)
    points = [decode_step_time(setup, batch, prompt_len + (k + 0.5) * steps / n)
              for k in range(n)]
    mean = lambda attr: sum(getattr(p, attr) for p in points) / n  # noqa: E731
    return PhaseTime(*(mean(f) for f in ("flops_per_gpu", "bytes_per_gpu", "compute_s",
                                         "memory_s", "comm_s", "overhead_s", "total_s")))
