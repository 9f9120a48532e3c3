"""The planner's inputs: precision, efficiency factors, deployment and workload (validated)."""
from __future__ import annotations

from dataclasses import dataclass, field

from turbollm.model_arch import ModelArch
from turbollm.plan.hardware import GPUSpec

FLOAT_DTYPES = ("fp32", "bf16", "fp16")
WEIGHT_FORMATS = FLOAT_DTYPES + ("fp8", "int8", "int4")
KV_DTYPES = FLOAT_DTYPES + ("fp8", "int8")
COMPUTE_DTYPES = ("auto",) + FLOAT_DTYPES + ("fp8", "int8")


@dataclass(frozen=True)
class Precision:
    """Storage formats of weights and KV cache, and the dtype the matmuls run in."""

    weights: str = "bf16"  # format of the linear-layer weights (the quantized part)
    dtype: str = "bf16"  # activations, embeddings, lm_head and norms
    kv_dtype: str = "bf16"
    group_size: int = 128  # int4: one fp16 scale + one fp16 zero per group of inputs
    # 'auto': fp8 weights run fp8 matmuls where the GPU has them; int8/int4 are weight-only
    # (dequantized to `dtype` in the kernel), the way our engine's quantized linears work.
    compute: str = "auto"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.compute not in COMPUTE_DTYPES:
            raise ValueError(f"compute must be one of {COMPUTE_DTYPES}, got {self.compute!r}")
        if self.group_size <= 0:
            raise ValueError("group_size must be positive")

    def compute_dtype(self, gpu: GPUSpec) -> str:
        """The dtype whose peak FLOP/s bounds the matmuls on `gpu`."""
        if self.compute != "auto":
            return self.compute
        if self.weights == "fp8" and gpu.supports("fp8"):
            return "fp8"
        if gpu.peak_flops(self.dtype) < gpu.peak_flops("fp32"):
            # a CPU without bf16/fp16 math: the engine stores 16-bit values and computes in fp32
            return "fp32"
        return self.dtype

    @property
    def label(self) -> str:
        w = f"int4-g{self.group_size}" if self.weights == "int4" else self.weights
        return f"{w} weights, {self.dtype} activations, {self.kv_dtype} KV"


@dataclass(frozen=True)
class Efficiency:
    """How much of the datasheet peaks real kernels reach (shown in every output)."""

    mfu: float = 0.5  # model FLOP/s utilization, for compute-bound phases
    mbu: float = 0.75  # memory bandwidth utilization, for memory-bound phases
    comm_eff: float = 0.7  # share of the interconnect bandwidth an all-reduce reaches
    overhead_s: float = 0.0  # fixed host-side cost per forward pass (launches, Python)

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu", "comm_eff"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.overhead_s < 0:
            raise ValueError("overhead_s must be >= 0")


@dataclass(frozen=True)
class Workload:
    """One kind of request and how many run together."""

    prompt_len: int = 512
    completion_len: int = 256
    batch: int = 1  # sequences decoded together (concurrency)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.completion_len < 1 or self.batch < 1:
            raise ValueError("prompt_len, completion_len and batch must be >= 1")

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.completion_len


@dataclass(frozen=True)
class Setup:
    """A model deployed on `n_gpus` x `gpu` with tensor parallelism."""

    arch: ModelArch
    gpu: GPUSpec
    n_gpus: int = 1
    precision: Precision = field(default_factory=Precision)
    efficiency: Efficiency = field(default_factory=Efficiency)
    gpu_mem_util: float = 0.9  # share of device memory the engine may use (rest: runtime)
    max_batched_tokens: int = 8192  # tokens per forward pass (chunked prefill)
    max_num_seqs: int = 256  # sequences per step; sizes the logits buffer
    model_name: str = "model"

    def __post_init__(self) -> None:
        if self.n_gpus < 1:
            raise ValueError("n_gpus must be >= 1")
        if not 0 < self.gpu_mem_util <= 1:
            raise ValueError("gpu_mem_util must be in (0, 1]")
        if self.max_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batched_tokens and max_num_seqs must be >= 1")
        if self.n_gpus > 1 and self.gpu.interconnect_gbps <= 0:
            raise ValueError(f"{self.gpu.name}: no interconnect bandwidth for tensor parallelism")
        tp_error = tensor_parallel_error(self.arch, self.n_gpus)
        if tp_error:
            raise ValueError(tp_error)


def tensor_parallel_error(arch: ModelArch, n: int) -> str | None:
    """Why `arch` cannot be split over `n` GPUs by heads, or None when it can."""
    if arch.num_attention_heads % n:
        return f"{arch.num_attention_heads} attention heads do not split over {n} GPUs"
    kv = arch.num_key_value_heads
    if kv % n and n % kv:  # KV heads either split evenly or are replicated
        return f"{kv} KV heads neither split over nor replicate onto {n} GPUs"
    return None
