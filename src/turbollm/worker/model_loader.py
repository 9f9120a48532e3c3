"""Build the model for a ModelConfig: resolve, read its config, construct, fill weights."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from turbollm.config import ModelConfig
from turbollm.loader.resolve import ResolvedModel, resolve_model
from turbollm.model_arch import ModelArch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ModelArch
    tokenizer: Any  # a transformers PreTrainedTokenizerFast, or None (dummy presets)
    source: ResolvedModel
    dtype: torch.dtype  # storage of weights and the KV cache (activations: model.compute_dtype)
    max_model_len: int


def read_arch(source: ResolvedModel, overrides: dict | None = None) -> tuple[ModelArch, dict]:
    """The architecture of a resolved model, from config.json, GGUF metadata or a preset."""
    if source.kind == "gguf":
        from turbollm.loader.gguf import GGUFCheckpoint
        hf_config = GGUFCheckpoint(source.path).hf_config
    elif source.kind == "hf_dir":
        from turbollm.loader.safetensors import read_hf_config
        hf_config = read_hf_config(source.path)
    else:
        from turbollm.model_presets import preset_config
        hf_config = preset_config(source.name)
    hf_config = {**hf_config, **(overrides or {})}
    return ModelArch.from_hf_config(hf_config), hf_config


def resolve_dtype(requested: str, arch: ModelArch, device: str) -> torch.dtype:
    """Storage dtype. 'auto': fp32 for fp32 checkpoints, fp16 for fp16 ones on CUDA, else bf16
    (on CPUs without bf16 math it is stored bf16 and computed in fp32: see compute_dtype_for)."""
    if requested != "auto":
        return _DTYPES[requested]
    saved = str(arch.torch_dtype or "").replace("torch.", "")
    if saved == "float32":
        return torch.float32
    if device.startswith("cuda") and saved == "float16":
        return torch.float16
    return torch.bfloat16


def compute_dtype_for(dtype: torch.dtype, device: str, requested: str = "auto") -> torch.dtype:
    """Activations' dtype, decided with the kernels that will serve them (the one place where
    `dtype=auto` becomes a compute dtype on CPU).

    - CUDA, or fp32 storage: the storage dtype.
    - CPU, 16-bit storage, dtype auto, with our C kernels (any x86 CPU with AVX2): fp32. Every
      C fast path (low-bit and 16-bit GEMVs that widen weights in registers, paged attention,
      the native decode step) takes fp32 activations; torch's bf16 math skips them all. On a
      Sapphire Rapids VM (AMX) this decodes the bundled Q4_1 model at ~4.4x the tok/s of bf16
      math, with a 512-token prefill ~7% slower (docs/benchmarks.md).
    - Otherwise (dtype asked for explicitly, or no C kernels): bf16 math where the CPU has bf16
      instructions (AMX / AVX-512 BF16); elsewhere bf16 and fp16 are storage formats computed
      in fp32 — as llama.cpp does with F16 weights on such CPUs.
    """
    if dtype == torch.float32 or device.startswith("cuda"):
        return dtype
    from turbollm.native_build import selected_isa
    from turbollm.platform_info import cpu_has_native_bf16
    if requested == "auto" and selected_isa() is not None:
        return torch.float32
    return dtype if dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def multi_row_products_in_bf16(asked: str, isa: str | None, requested: str,
                               storage: torch.dtype, compute: torch.dtype) -> bool:
    """KernelConfig.prefill_dtype resolved: products of several rows in bf16 (oneDNN's bf16
    GEMM; on AMX CPUs also our exact int4/int8 tiles for 8-128 rows; layers/prefill_gemm.py).
    `auto`: where our C kernels run (an x86 variant), the CPU has bf16 instructions (AMX or
    AVX-512 BF16), dtype is auto over a 16-bit or low-bit checkpoint (an fp32 one stays fp32
    throughout) and activations are fp32. A 512-token prefill of the bundled model takes 0.51-0.56
    s in bf16 against 0.82-0.86 s in fp32 on a Zen 4 EPYC without AMX (session 20), 0.31 against
    0.58 s on a Sapphire Rapids VM (session 15)."""
    if asked != "auto":
        return asked == "bfloat16"
    from turbollm.platform_info import cpu_has_native_bf16
    return (isa is not None and cpu_has_native_bf16() and requested == "auto"
            and storage != torch.float32 and compute == torch.float32)


def iter_checkpoint(source: ResolvedModel, dtype: torch.dtype, lazy: bool = False):
    """(hf_name, tensor) pairs of a checkpoint, whatever its format. lazy: safetensors and GGUF
    tensors come as LazyTensors / LazyGGUFTensors (loader/lazy_tensor.py), read only as far as
    the model's loaders ask, so that a tensor- or pipeline-parallel rank reads its own slices."""
    if source.kind == "gguf":
        from turbollm.loader.gguf import GGUFCheckpoint
        return GGUFCheckpoint(source.path).iter_tensors(dtype, lazy=lazy)
    from turbollm.loader.compressed_tensors import iter_compressed_tensors, sparsity_config
    if sparsity_config(source.path) is not None:  # compressed-tensors sparse: dense at load
        return iter_compressed_tensors(source.path, dtype)
    from turbollm.loader.lazy_tensor import iter_safetensors_lazy
    from turbollm.loader.safetensors import iter_safetensors
    return (iter_safetensors_lazy if lazy else iter_safetensors)(source.path, dtype)


def load_tokenizer_for(source: ResolvedModel, tokenizer: str | None):
    from turbollm.loader.tokenizer import load_tokenizer
    if tokenizer:
        return load_tokenizer(tokenizer)
    if source.kind == "preset":
        return None
    return load_tokenizer(source.path)


def load_model(cfg: ModelConfig, device: str, backend, parallel=None) -> LoadedModel:
    """Resolve, construct on `device` and fill the model (random weights for load_format=dummy).
    With a distributed ParallelState: this rank's slice of it (see check_parallel_source)."""
    from turbollm.loader.dummy import init_dummy_weights
    from turbollm.models.registry import get_model_class
    from turbollm.loader.turbollm_checkpoint import checkpoint_config as turbollm_checkpoint_config
    from turbollm.loader.turbollm_checkpoint import load_checkpoint as load_turbollm_checkpoint
    from turbollm.loader.fp8_checkpoint import fp8_checkpoint_config, load_fp8_checkpoint
    from turbollm.loader.awq_gptq import load_prequantized, prequantized_config

    source = resolve_model(cfg.model, cfg.load_format)
    if cfg.load_format == "gguf" and source.kind != "gguf":
        raise ValueError(f"load_format 'gguf' but {cfg.model!r} is not a GGUF file")
    if cfg.load_format == "safetensors" and source.kind != "hf_dir":
        raise ValueError(f"load_format 'safetensors' but {cfg.model!r} is not an HF directory")
    if source.kind == "preset" and cfg.load_format != "dummy":
        raise ValueError(f"{cfg.model!r} is a config preset: it only loads with load_format='dummy'")
    if parallel is not None:
        check_parallel_source(cfg, source)
    arch, _ = read_arch(source, cfg.hf_config_overrides)
    dtype = resolve_dtype(cfg.dtype, arch, device)
    compute = compute_dtype_for(dtype, device, cfg.dtype)
    max_len = cfg.max_model_len or arch.max_position_embeddings
    model_cls = get_model_class(arch)
    # Constructing under torch.device puts rotary tables and weights straight on the target.
    extra = {} if parallel is None else {"parallel": parallel}
    with torch.device(device):
        model = model_cls(arch, backend, max_position=max_len, dtype=compute, device=device,
                          weight_dtype=dtype, **extra)
    if cfg.load_format == "dummy" and parallel is not None:
        # every rank draws the whole model's values and keeps its slice, so a sharded dummy
        # model is the single-process one, split (tests compare the two)
        from turbollm.loader.dummy import dummy_checkpoint
        model.load_weights(dummy_checkpoint(arch, dtype, seed=cfg.seed))
    elif cfg.load_format == "dummy":
        init_dummy_weights(model, seed=cfg.seed)
    elif source.kind == "hf_dir" and (qcfg := prequantized_config(source.path)) is not None:
        load_prequantized(model, source.path, dtype, qcfg)  # AutoAWQ / GPTQ layouts
    elif source.kind == "hf_dir" and (tq := turbollm_checkpoint_config(source.path)) is not None:
        load_turbollm_checkpoint(model, source.path, dtype, tq)  # `turbollm quantize` int8/int4
    elif source.kind == "hf_dir" and (fcfg := fp8_checkpoint_config(source.path)) is not None:
        load_fp8_checkpoint(model, source.path, dtype, fcfg)  # AutoFP8 / vLLM "fp8" layout
    else:
        model.load_weights(iter_checkpoint(source, dtype, lazy=parallel is not None))
    _quantize_at_load(model, cfg, source)
    model.eval()
    tok = load_tokenizer_for(source, cfg.tokenizer)
    return LoadedModel(model, arch, tok, source, dtype, max_len)


def check_parallel_source(cfg: ModelConfig, source: ResolvedModel) -> None:
    """Which checkpoints a tensor/pipeline-parallel rank loads: those whose tensors arrive
    dense, one at a time (safetensors, GGUF dequantized, dummy), sliced by each parameter's
    weight_loader and then quantized per rank (int8/int4/fp8). Pre-quantized layouts (AutoAWQ,
    GPTQ, turbollm int8/int4, fp8 checkpoints) would have to be sliced in their packed form:
    refused, in one line. A GGUF file's native blocks are sliced whole (loader/gguf_native.py)."""
    from turbollm.loader.awq_gptq import prequantized_config
    from turbollm.loader.fp8_checkpoint import fp8_checkpoint_config
    from turbollm.loader.turbollm_checkpoint import checkpoint_config
    if source.kind == "hf_dir" and cfg.load_format != "dummy":
        for probe, what in ((prequantized_config, "AWQ/GPTQ"), (checkpoint_config,
                            "turbollm-quantized"), (fp8_checkpoint_config, "fp8")):
            if probe(source.path) is not None:
                raise ValueError(f"{what} checkpoints cannot be loaded with tensor/pipeline "
                                 "parallelism yet: load the dense checkpoint and pass "
                                 "--quantization int8/int4/fp8")



def _quantize_at_load(model, cfg: ModelConfig, source: ResolvedModel) -> None:
    """Serve a GGUF file's low-bit linears natively, or quantize dense weights (int8/int4)."""
    from turbollm.quantization.apply import LAYER_METHODS, quantize_model, resolve_method
    method = resolve_method(cfg.quantization, source.kind)
    if method == "gguf" and cfg.load_format != "dummy":
        from turbollm.loader.gguf import GGUFCheckpoint
        from turbollm.loader.gguf_native import install_gguf_native
        install_gguf_native(model, GGUFCheckpoint(source.path))
    elif method in LAYER_METHODS:
        quantize_model(model, method, cfg.quantization_group_size)
    from turbollm.loader.compressed_tensors import sparsity_config
    from turbollm.quantization.sparse_method import install_sparse
    stored = sparsity_config(source.path) if source.kind == "hf_dir" else None
    install_sparse(model, cfg.sparsity, stored_sparse=stored is not None,
                   structure=(stored or {}).get("sparsity_structure", "unstructured"))
