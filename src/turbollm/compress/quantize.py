"""`turbollm quantize`: write a quantized checkpoint that `LLM(dir)` / `turbollm serve` load.

    turbollm quantize --model M --method int8|int4 [--group-size G] --output DIR

METHODS maps a method name to a function (model, output, group_size, engine_kwargs) -> Path;
other methods (awq, gptq) register there with their own writers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from turbollm.config import QUANTIZATION_METHODS


def quantize_rtn(method: str) -> Callable[..., Path]:
    """int8 / int4: quantize at load (exactly what `--quantization` does), write our layout."""
    def run(model: str, output: Path, group_size: int, engine_kwargs: dict) -> Path:
        from turbollm import LLM
        from turbollm.loader.resolve import resolve_model
        from turbollm.loader.turbollm_checkpoint import write_checkpoint
        from turbollm.worker.model_loader import read_arch
        llm = LLM(model, quantization=method, quantization_group_size=group_size,
                  **engine_kwargs)
        worker = llm.engine.executor.worker
        _, hf_config = read_arch(resolve_model(model, engine_kwargs.get("load_format", "auto")))
        return write_checkpoint(worker.model, hf_config, output, worker.tokenizer,
                                worker.loaded.dtype)
    return run


def quantize_calibrated(method: str) -> Callable[..., Path]:
    """awq / gptq: calibrate on the built-in corpus, write the AutoAWQ-GEMM / GPTQ layout."""
    def run(model: str, output: Path, group_size: int, engine_kwargs: dict) -> Path:
        return export_calibrated_checkpoint(model, method, group_size, output, **engine_kwargs)
    return run


def export_calibrated_checkpoint(model: str, method: str, group_size: int, output_dir,
                                 checkpoint_format: str = "gptq", **engine_kwargs) -> Path:
    """`turbollm quantize --method awq|gptq`: load `model` dense, calibrate on the built-in
    corpus, quantize, and write an AutoAWQ-GEMM (awq) or GPTQ (gptq) checkpoint directory."""
    from turbollm import LLM
    from turbollm.loader.awq_gptq import write_quantized_checkpoint
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import read_arch

    if method not in ("awq", "gptq"):
        raise ValueError(f"unknown calibrated method {method!r} (awq or gptq)")
    engine_kwargs.setdefault("dtype", "float32")  # calibrate on full-precision activations
    llm = LLM(model, quantization=method, quantization_group_size=group_size, **engine_kwargs)
    _, hf_config = read_arch(resolve_model(model, engine_kwargs.get("load_format", "auto")))
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    return write_quantized_checkpoint(llm.engine.executor.worker.model, hf_config, output_dir,
                                      method, llm.tokenizer, checkpoint_format)


METHODS: dict[str, Callable[..., Path]] = {
    "int8": quantize_rtn("int8"),
    "int4": quantize_rtn("int4"),
    "awq": quantize_calibrated("awq"),
    "gptq": quantize_calibrated("gptq"),
}


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a quantized checkpoint (safetensors + config + "
                                        "tokenizer) that serve/LLM load directly")
    p.add_argument("--model", required=True, help="model directory, GGUF file or hub id")
    p.add_argument("--method", required=True,
                   choices=[m for m in QUANTIZATION_METHODS
                            if m not in ("none", "gguf", "fp8")])  # fp8: at load only
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                   help="int4 / AWQ / GPTQ group size (a smaller multiple of 32 is used where it "
                        "does not divide a layer's input width)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default="auto", help="storage dtype of the unquantized tensors")
    p.add_argument("--tokenizer", default=None)
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    fn = METHODS.get(args.method)
    if fn is None:
        raise NotImplementedError(f"quantize --method {args.method} is not available yet")
    kw = {"dtype": args.dtype, "kv_cache_memory": "64MiB"}
    if args.tokenizer:
        kw["tokenizer"] = args.tokenizer
    out = fn(args.model, Path(args.output), args.group_size, kw)
    print(f"wrote {out}")
    return 0
