"""`--recommend`: the cheapest catalog configuration that meets the latency SLOs."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

from turbollm.model_arch import ModelArch
from turbollm.plan.cost_model import ApiPrice, Estimate, Slo, estimate
from turbollm.plan.hardware import GPUSpec
from turbollm.plan.setup import Efficiency, Precision, Setup, Workload, tensor_parallel_error

DEFAULT_GPU_COUNTS = (1, 2, 4, 8)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def precision_options(dtype: str = "bf16", kv_dtype: str | None = None,
                      group_size: int = 128) -> list[Precision]:
    """The weight formats the search tries: unquantized, fp8, int8 and int4."""
    kv = kv_dtype or dtype
    return [Precision(weights=w, dtype=dtype, kv_dtype=kv, group_size=group_size)
            for w in (dtype, "fp8", "int8", "int4")]


@dataclass(frozen=True)
class Candidate:
    """One configuration that meets the SLO, at its cheapest batch."""

    estimate: Estimate

    @property
    def cost_per_request(self) -> float:
        return self.estimate.cost.per_request

    @property
    def key(self) -> tuple[str, int, str]:
        s = self.estimate.setup
        return s.gpu.name, s.n_gpus, s.precision.weights


def _best_batch(base: Setup, workload: Workload, slo: Slo, batches: Iterable[int],
                api: ApiPrice | None) -> Estimate | None:
    """The batch with the lowest cost per request that fits and meets the SLO."""
    best = None
    for b in batches:
        est = estimate(base, replace(workload, batch=b), api)
        if not est.memory.fits_weights:
            return None  # weights do not fit: no batch will
        if not est.memory.fits:
            break  # larger batches need even more KV cache
        if est.meets(slo) and (best is None or est.cost.per_request < best.cost.per_request):
            best = est
    return best


def recommend(arch: ModelArch, workload: Workload, slo: Slo, gpus: Iterable[GPUSpec],
              precisions: Iterable[Precision] | None = None,
              gpu_counts: Iterable[int] = DEFAULT_GPU_COUNTS,
              batches: Iterable[int] = DEFAULT_BATCHES,
              efficiency: Efficiency | Callable[[GPUSpec], Efficiency] | None = None,
              api: ApiPrice | None = None,
              model_name: str = "model", **setup_kwargs) -> list[Candidate]:
    """All (GPU, count, precision) configurations meeting `slo`, cheapest first per request.

    `efficiency`: one for all GPUs, a function of the GPU, or None for each GPU's default
    MFU/MBU. GPUs without a price are skipped,
    since 'cheapest' means nothing for them.
    """
    precisions = list(precisions or precision_options())
    batches = sorted(set(batches))
    found: list[Candidate] = []
    for gpu in gpus:
        if gpu.price_per_hour <= 0:
            continue
        if efficiency is None:
            eff = Efficiency(mfu=gpu.default_mfu, mbu=gpu.default_mbu)
        else:
            eff = efficiency(gpu) if callable(efficiency) else efficiency
        for n in gpu_counts:
            if tensor_parallel_error(arch, n) or (n > 1 and gpu.interconnect_gbps <= 0):
                continue
            for prec in precisions:
                setup = Setup(arch, gpu, n, prec, eff, model_name=model_name, **setup_kwargs)
                best = _best_batch(setup, workload, slo, batches, api)
                if best is not None:
                    found.append(Candidate(best))
    found.sort(key=lambda c: (c.cost_per_request, c.estimate.e2e_s))
    return found
