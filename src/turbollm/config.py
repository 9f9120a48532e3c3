"""Engine configuration: dataclasses validated in __post_init__; the CLI is generated from them.

Each field's `metadata["help"]` becomes the `--flag` help text (see `cli_args.py`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from turbollm.native_build import ISA_CHOICES
from turbollm.sizing import parse_memory_size

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATION_METHODS = ("none", "int8", "int4", "awq", "gptq", "gguf", "fp8")
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "int8", "fp8_e4m3")
SPECULATIVE_METHODS = ("none", "ngram", "draft")
LORA_DTYPES = ("auto", "float32", "bfloat16")
SPARSITY_MODES = ("auto", "bitmask", "none")  # quantization/sparse_method.py
STRUCTURED_OUTPUT_BACKENDS = ("xgrammar", "llguidance")
CPU_ISAS = ISA_CHOICES  # auto, then native_build's variants
PREFILL_DTYPES = ("auto", "float32", "bfloat16")
BATCH_INVARIANT = ("seeded", "all", "off")
DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger(__name__)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    """What model to run and how to load it."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "model: 'smollm2-135m' (bundled GGUF), an HF directory, a .gguf file, or a Hub id"))
    tokenizer: str | None = field(default=None, metadata=_help(
        "tokenizer directory or file (default: the model's own)"))
    dtype: str = field(default="auto", metadata=_help(
        "compute dtype; auto = the checkpoint's 16-bit dtype (bf16 on CPU), fp32 for fp32 checkpoints",
        choices=DTYPES))
    load_format: str = field(default="auto", metadata=_help(
        "weights format; 'dummy' = random weights of the config's shapes", choices=LOAD_FORMATS))
    max_model_len: int | None = field(default=None, metadata=_help(
        "context length (prompt + output); default: the model's, capped by the KV cache"))
    seed: int = field(default=0, metadata=_help("seed for random weights and unseeded sampling"))
    quantization: str | None = field(default=None, metadata=_help(
        "weight quantization applied at load (default: the checkpoint's own)",
        choices=QUANTIZATION_METHODS))
    quantization_group_size: int = field(default=128, metadata=_help(
        "group size of int4 / AWQ / GPTQ quantization at load"))
    sparsity: str = field(default="auto", metadata=_help(
        "pruned weights: decode reads them bitmask-compressed (auto: when the checkpoint is "
        "stored sparse, compressed-tensors; bitmask: any checkpoint's linears that are >= 30%% "
        "zeros; none: dense)", choices=SPARSITY_MODES))
    hf_config_overrides: dict | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, "
                             f"got {self.quantization!r}")
        if self.sparsity not in SPARSITY_MODES:
            raise ValueError(f"sparsity must be one of {SPARSITY_MODES}, got {self.sparsity!r}")
        if self.quantization_group_size not in (32, 64, 128):
            raise ValueError("quantization_group_size must be 32, 64 or 128, got "
                             f"{self.quantization_group_size}")


@dataclass
class CacheConfig:
    """Paged KV cache: block size, memory budget, prefix caching."""

    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    kv_cache_memory: str | None = field(default=None, metadata=_help(
        "KV cache budget, e.g. '2GiB' (default: 2GiB on CPU; on CUDA 90%% of free memory after "
        "weights and a warm-up pass)"))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "reuse KV blocks of repeated prompt prefixes"))
    kv_cache_dtype: str = field(default="auto", metadata=_help(
        "KV cache storage: auto = the model's dtype; float16/bfloat16 = 2 bytes per value "
        "whatever the model computes in (llama.cpp's default); int8 = per-token, per-head "
        "scales (half the bytes of 16-bit)", choices=KV_CACHE_DTYPES))
    num_gpu_blocks_override: int | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and parse_memory_size(self.kv_cache_memory) <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")

    @property
    def kv_cache_memory_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_memory_size(self.kv_cache_memory)


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = field(default=128, metadata=_help("most sequences in one batch"))
    max_num_batched_tokens: int = field(default=1024, metadata=_help(
        "token budget of one step (prefill chunks + decodes)"))
    enable_chunked_prefill: bool = field(default=True, metadata=_help(
        "split long prompts across steps so running decodes never stall"))
    max_decode_stall: float = field(default=0.0, metadata=_help(
        "while requests decode, a step that also computes prompt tokens may take at most this "
        "many times a decode-only step of the same batch (e.g. 2): the prompt chunk is sized "
        "from the engine's measured step times, so streams keep a steady pace while new "
        "prompts are prefilled, at a cost in time to first token and throughput where a prompt "
        "token costs much of a decode step (2 CPU cores: docs/benchmarks.md). 0 = off: "
        "prefill_chunk_while_decoding alone. Chunked prefill only"))
    prefill_chunk_while_decoding: int = field(default=64, metadata=_help(
        "most prompt tokens a step computes while other requests are decoding (or 16 per "
        "decoding request, where that is more) until max_decode_stall has step times to go "
        "by, or always where it is 0 (0 here = up to the step budget). Chunked prefill only"))
    structured_output_backend: str = field(default="xgrammar", metadata=_help(
        "grammar engine for constrained decoding (response_format, guided_*): xgrammar fills "
        "token masks ~20x faster; llguidance compiles lazily", choices=STRUCTURED_OUTPUT_BACKENDS))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.structured_output_backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(f"structured_output_backend must be one of "
                             f"{STRUCTURED_OUTPUT_BACKENDS}, got {self.structured_output_backend!r}")
        if self.max_decode_stall != 0 and not self.max_decode_stall > 1:
            raise ValueError("max_decode_stall must be > 1 (or 0: off), got "
                             f"{self.max_decode_stall}")
        if self.prefill_chunk_while_decoding < 0:
            raise ValueError("prefill_chunk_while_decoding must be >= 0, got "
                             f"{self.prefill_chunk_while_decoding}")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: propose K tokens cheaply, verify them in one target forward."""

    speculative_method: str = field(default="none", metadata=_help(
        "ngram = prompt lookup; draft = a smaller model with the same tokenizer",
        choices=SPECULATIVE_METHODS))
    num_speculative_tokens: int = field(default=4, metadata=_help(
        "most tokens proposed per step (adapted to the acceptance rate)"))
    draft_model: str | None = field(default=None, metadata=_help(
        "draft model (same forms as --model); default: the target itself, see --draft-layers"))
    draft_layers: int | None = field(default=None, metadata=_help(
        "self-speculation: the draft is the target's first k layers"))
    draft_quantization: str | None = field(default=None, metadata=_help(
        "quantization of the draft model", choices=QUANTIZATION_METHODS))
    verify_cost: str = field(default="measure", metadata=_help(
        "cost of verifying one more proposal, in plain decode steps: 'measure' (the engine "
        "times its own steps at start-up) or a number, e.g. 0.25"))
    ngram_max: int = field(default=4, metadata=_help("longest n-gram matched by prompt lookup"))
    ngram_min: int = field(default=1, metadata=_help("shortest n-gram matched by prompt lookup"))

    def __post_init__(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS}, "
                             f"got {self.speculative_method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16], got "
                             f"{self.num_speculative_tokens}")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise ValueError(f"draft_layers must be >= 1, got {self.draft_layers}")
        if self.verify_cost != "measure":
            try:
                ok = float(self.verify_cost) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError("verify_cost must be 'measure' or a number >= 0, got "
                                 f"{self.verify_cost!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max, got "
                             f"{self.ngram_min}, {self.ngram_max}")

    @property
    def enabled(self) -> bool:
        return self.speculative_method != "none"


@dataclass
class DeviceConfig:
    """Where to run."""

    device: str = field(default="auto", metadata=_help(
        "cpu, cuda, cuda:N, or auto (cuda when available)"))
    num_threads: int | None = field(default=None, metadata=_help(
        "CPU threads for torch (default: all cores)"))

    def __post_init__(self) -> None:
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    def resolved_device(self) -> str:
        import torch
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")
        return self.device


@dataclass
class LoRAConfig:
    """LoRA adapters served beside the base model (PEFT directories; requests pick one)."""

    enable_lora: bool = field(default=False, metadata=_help(
        "serve LoRA adapters: requests may name one (LoRARequest, or the server's model name)"))
    max_loras: int = field(default=4, metadata=_help(
        "most distinct adapters in one step (the adapter slots the model keeps)"))
    max_lora_rank: int | None = field(default=None, metadata=_help(
        "slot rank; default: as large as the largest adapter loaded (a larger one grows the "
        "slots); set it to refuse larger adapters"))
    max_cpu_loras: int | None = field(default=None, metadata=_help(
        "adapters kept loaded in memory (LRU; an evicted one reloads when asked again); "
        "default: max_loras"))
    lora_dtype: str = field(default="auto", metadata=_help(
        "dtype of the adapter factors in the slots: auto = bfloat16 on a quantized base on CPU "
        "(decode reads the factors every step; their bf16 rounding is far below the base's "
        "own 4/8-bit error) and the compute dtype otherwise", choices=LORA_DTYPES))

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {LORA_DTYPES}, got {self.lora_dtype!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")


PARALLEL_COMM = ("auto", "shm", "gloo")
# who starts the ranks: the engine itself (spawned children on this host, executor/multiproc.py)
# or torchrun, one process per rank on any number of hosts (executor/torchrun.py)
LAUNCHERS = ("spawn", "torchrun")


@dataclass
class ParallelConfig:
    """Tensor and pipeline parallelism: the engine starts T x P worker processes on this host
    (executor/multiproc.py), or torchrun started them on one host or several
    (executor/torchrun.py); docs/distributed.md."""

    tensor_parallel_size: int = field(default=1, metadata=_help(
        "split every layer's heads and MLP columns across this many worker processes",
        aliases=("-tp",)))
    pipeline_parallel_size: int = field(default=1, metadata=_help(
        "split the layers into this many contiguous stages, one group of processes each",
        aliases=("-pp",)))
    pipeline_micro_batches: int | None = field(default=None, metadata=_help(
        "pipeline parallelism: steps in flight at once, each over its share of the running "
        "requests, so that stage s + 1 works on one while stage s works on the next (default: "
        "the number of stages; 1 = one step at a time, the stages take turns)"))
    cpu_threads_per_worker: int | None = field(default=None, metadata=_help(
        "torch threads of each worker process on CPU (default: the cores this process may use, "
        "divided among the workers, at least 1)"))
    parallel_comm: str = field(default="auto", metadata=_help(
        "tensor-parallel collectives on CPU: shm = a shared-memory all-reduce between the "
        "host's ranks; gloo = torch.distributed's TCP one; auto = shm on CPU, NCCL on CUDA",
        choices=PARALLEL_COMM))
    distributed_timeout_s: float = field(default=120.0, metadata=_help(
        "longest wait on another rank (a collective, a step's reply) before the engine "
        "declares it lost and stops every worker"))
    # not a flag: `python -m turbollm.serve` (the torchrun entry point) sets it
    launcher: str = field(default="spawn", metadata=_help(
        "spawn = the engine starts its worker processes; torchrun = this process is rank 0 of "
        "a torchrun launch and the other ranks run `python -m turbollm.serve` too",
        choices=LAUNCHERS, cli=False))

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ValueError(f"pipeline_micro_batches must be >= 1, got "
                             f"{self.pipeline_micro_batches}")
        if self.cpu_threads_per_worker is not None and self.cpu_threads_per_worker < 1:
            raise ValueError(f"cpu_threads_per_worker must be >= 1, got "
                             f"{self.cpu_threads_per_worker}")
        if self.parallel_comm not in PARALLEL_COMM:
            raise ValueError(f"parallel_comm must be one of {PARALLEL_COMM}, got "
                             f"{self.parallel_comm!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def steps_in_flight(self) -> int:
        """Engine steps out at once (pipeline_micro_batches; one without pipeline stages)."""
        if self.pipeline_parallel_size == 1:
            return 1
        return self.pipeline_micro_batches or self.pipeline_parallel_size

    def threads_per_worker(self) -> int:
        return self.cpu_threads_per_worker or max(1, default_num_threads() // self.world_size)


# Environment variables that switched kernels before KernelConfig; read, with a warning, where
# the field is left unset (deprecated: they go in the next release).
DEPRECATED_KERNEL_ENV = {
    "TURBOLLM_NATIVE_DECODE": ("native_decode", lambda v: v != "0"),
    "TURBOLLM_EXACT_ACTIVATIONS": ("exact_activations", lambda v: v not in ("", "0")),
    "TURBOLLM_TILE_CONFIG": ("tile_config", str),
}


@dataclass
class KernelConfig:
    """Which kernels serve the model: switches for the fast paths, chosen per engine."""

    native_decode: bool | None = field(default=None, metadata=_help(
        "run decode-shaped CPU steps as direct C calls (models/native_decode.py) instead of "
        "torch modules; same numbers, less per-op overhead (default: on)"))
    exact_activations: bool | None = field(default=None, metadata=_help(
        "keep few-row activations of low-bit GEMVs in fp32 instead of int16 blocks (~2e-5 "
        "relative; slower). Process-wide: the last engine built sets it (default: off)"))
    cpu_isa: str = field(default="auto", metadata=_help(
        "x86 variant of our C kernels: auto = the best this CPU runs (amx > avx512 > avx2); "
        "process-wide, fixed by the first engine", choices=CPU_ISAS))
    prefill_dtype: str = field(default="auto", metadata=_help(
        "products of several rows (prompt chunks, decode batches) with fp32 activations: auto "
        "= bfloat16 where the CPU has bf16 instructions (AMX or AVX-512 BF16) and dtype is auto "
        "(bf16 via oneDNN past our C kernels' row counts; on AMX also our exact tiles for 8-128 "
        "rows of packed int4/int8 weights), else float32. Process-wide", choices=PREFILL_DTYPES))
    batch_invariant: str = field(default="seeded", metadata=_help(
        "steps whose every row is computed as if alone (row kernels, C row attention; slower "
        "for prompts and big batches), so outputs do not depend on what else runs: seeded = "
        "steps holding a seeded sampling request (its text then depends on its seed alone), "
        "all = every step (greedy answers too), off = none. CPU fp32 C path only",
        choices=BATCH_INVARIANT))
    tile_config: str | None = field(default=None, metadata=_help(
        "JSON file of Triton tile configurations for the CUDA low-bit kernels, as written by "
        "scripts/gpu_tune.py --tiles. Process-wide (default: the built-in H100 tiles)"))

    def __post_init__(self) -> None:
        for var, (name, parse) in DEPRECATED_KERNEL_ENV.items():
            if getattr(self, name) is None and os.environ.get(var) is not None:
                log.warning("%s is deprecated: use --%s (or %s=...)", var,
                            name.replace("_", "-"), name)
                setattr(self, name, parse(os.environ[var]))
        if self.native_decode is None:
            self.native_decode = True
        if self.exact_activations is None:
            self.exact_activations = False
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa must be one of {CPU_ISAS}, got {self.cpu_isa!r}")
        if self.prefill_dtype not in PREFILL_DTYPES:
            raise ValueError(f"prefill_dtype must be one of {PREFILL_DTYPES}, got "
                             f"{self.prefill_dtype!r}")
        if self.batch_invariant not in BATCH_INVARIANT:
            raise ValueError(f"batch_invariant must be one of {BATCH_INVARIANT}, got "
                             f"{self.batch_invariant!r}")
        if self.tile_config is not None and not os.path.isfile(self.tile_config):
            raise ValueError(f"tile_config {self.tile_config!r} is not a file")


@dataclass
class EngineConfig:
    """Everything the engine needs, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.parallel.world_size > 1:
            check_parallel_support(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (LLM(...) and the CLI) by field name."""
        from dataclasses import fields
        parts = {}
        for name, klass in (("model", ModelConfig), ("cache", CacheConfig),
                            ("scheduler", SchedulerConfig), ("device", DeviceConfig),
                            ("speculative", SpeculativeConfig), ("kernel", KernelConfig),
                            ("lora", LoRAConfig), ("parallel", ParallelConfig)):
            own = {f.name for f in fields(klass)}
            parts[name] = klass(**{k: kwargs.pop(k) for k in list(kwargs) if k in own})
        if kwargs:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(kwargs))}")
        return cls(**parts)


def check_parallel_support(cfg: EngineConfig) -> None:
    """Refuse, in one line each, what tensor/pipeline parallelism does not run yet (see
    docs/distributed.md), rather than fail inside a worker process."""
    if cfg.speculative.speculative_method == "draft":
        raise ValueError("speculative_method 'draft' is not supported with tensor/pipeline "
                         "parallelism yet (ngram speculation is)")
    if cfg.lora.enable_lora:
        raise ValueError("LoRA adapters are not supported with tensor/pipeline parallelism yet")
    if cfg.model.quantization in ("awq", "gptq"):
        raise ValueError(f"quantization {cfg.model.quantization!r} (calibrated at load) is not "
                         "supported with tensor/pipeline parallelism yet: use none, int8, int4 "
                         "or fp8 (each rank quantizes its own slice of the dense weights)")


def default_num_threads() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
