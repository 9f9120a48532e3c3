"""Check the planner against the engine: predicted vs measured batch-1 decode and prefill.

`compare_with_engine` takes any callable that times the engine, so it works with a fake in
tests and with `turbollm.LLM` (`python -m turbollm.plan.validate`).
"""
from __future__ import annotations

import argparse
import ast
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

from turbollm.model_arch import ModelArch
from turbollm.plan.hardware import GPUSpec
from turbollm.plan.latency import mean_decode_step, prefill_time
from turbollm.plan.models import load_model
from turbollm.plan.setup import Efficiency, Precision, Setup


@dataclass(frozen=True)
class EngineTiming:
    """What the engine took on this machine, batch 1."""

    prefill_s: float  # one prompt of prompt_len tokens, up to its first token
    decode_s_per_token: float  # mean time per output token after the first


# (prompt_len, decode_tokens) -> timing of one batch-1 request of that shape
MeasureEngine = Callable[[int, int], EngineTiming]
# (prompt_token_ids, max_tokens) -> None; runs one request to completion, ignoring EOS
Generate = Callable[[list[int], int], None]


@dataclass(frozen=True)
class Row:
    """One metric, predicted next to measured."""

    metric: str
    predicted_s: float
    measured_s: float

    @property
    def error(self) -> float:
        """Relative error of the prediction against the measurement."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    def within(self, tolerance: float) -> bool:
        return abs(self.error) <= tolerance


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured rows for one setup."""

    setup: Setup
    prompt_len: int
    decode_tokens: int
    rows: tuple[Row, ...]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(r.within(self.tolerance) for r in self.rows)

    def format(self) -> str:
        """Side-by-side table."""
        s = self.setup
        eff = s.efficiency
        lines = [f"planner vs engine: {s.model_name} on {s.gpu.name}, {s.precision.label}",
                 f"  hardware: {s.gpu.bandwidth_gbps:.1f} GB/s, "
                 + ", ".join(f"{d} {v * 1e3:.0f} GFLOP/s" for d, v in s.gpu.tflops.items())
                 + f"; MFU {eff.mfu:.2f}, MBU {eff.mbu:.2f}, "
                   f"overhead {eff.overhead_s * 1e3:.2f} ms/pass",
                 f"  {'metric':<34} {'predicted':>11} {'measured':>11} {'error':>8}"]
        for r in self.rows:
            mark = "ok" if r.within(self.tolerance) else "OFF"
            lines.append(f"  {r.metric:<34} {r.predicted_s * 1e3:9.2f}ms "
                         f"{r.measured_s * 1e3:9.2f}ms {r.error:+8.1%} {mark}")
        lines.append(f"  within {self.tolerance:.0%}: {'yes' if self.ok else 'NO'}")
        return "\n".join(lines) + "\n"


def predict_batch1(setup: Setup, prompt_len: int, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) the planner predicts at batch 1."""
    pre = prefill_time(setup, 1, prompt_len).total_s
    dec = mean_decode_step(setup, 1, prompt_len, decode_tokens + 1).total_s
    return pre, dec


def compare_with_engine(measure: MeasureEngine, model: str | ModelArch = "SmolLM2-135M",
                        hardware: GPUSpec | None = None, precision: Precision | None = None,
                        efficiency: Efficiency | None = None, prompt_len: int = 512,
                        decode_tokens: int = 64, tolerance: float = 0.30,
                        out: Callable[[str], None] | None = print) -> Comparison:
    """Time the engine with `measure`, predict the same on `hardware` (default: measured
    locally), print both side by side and return the comparison.

    `model` is a preset / config.json path, or the ModelArch the engine loaded.
    """
    if hardware is None:
        from turbollm.plan.local_hw import measure_local

        hardware = measure_local()
    if isinstance(model, ModelArch):
        name, arch = model.architectures[0] if model.architectures else model.model_type, model
    else:
        name, arch = load_model(model)
    dtype = hardware.preferred_dtype
    precision = precision or Precision(weights=dtype, dtype=dtype, kv_dtype=dtype)
    efficiency = efficiency or Efficiency(mfu=hardware.default_mfu,
                                          mbu=hardware.mbu_for(precision.weights))
    setup = Setup(arch, hardware, 1, precision, efficiency, model_name=name)
    pred_prefill, pred_decode = predict_batch1(setup, prompt_len, decode_tokens)
    measured = measure(prompt_len, decode_tokens)
    rows = (Row(f"prefill {prompt_len} tokens (batch 1)", pred_prefill, measured.prefill_s),
            Row("decode per token (batch 1)", pred_decode, measured.decode_s_per_token))
    cmp = Comparison(setup, prompt_len, decode_tokens, rows, tolerance)
    if out is not None:
        out(cmp.format())
    return cmp


def time_generate(generate: Generate, vocab_size: int, repeats: int = 3) -> MeasureEngine:
    """Turn a `generate(prompt_ids, max_tokens)` call into a MeasureEngine.

    Prefill = time of a 1-token completion; decode per token = the extra time of
    `decode_tokens` more tokens, divided by their number. Best of `repeats`, after a warm-up.
    Every call gets a fresh random prompt, so a prefix cache cannot skip the prefill.
    """
    rng = random.Random(0)

    def measure(prompt_len: int, decode_tokens: int) -> EngineTiming:
        def best(max_tokens: int) -> float:
            times = []
            for _ in range(repeats):
                ids = [rng.randrange(vocab_size) for _ in range(prompt_len)]
                t0 = time.perf_counter()
                generate(ids, max_tokens)
                times.append(time.perf_counter() - t0)
            return min(times)

        best(2)  # warm-up: lazy init, kernel selection, allocator
        first = best(1)
        full = best(1 + decode_tokens)
        return EngineTiming(first, max(full - first, 0.0) / decode_tokens)
    return measure


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def engine_generate(engine_args: dict) -> tuple[Generate, ModelArch, str]:
    """A Generate backed by `turbollm.LLM`, with the arch and dtype the engine loaded."""
    from turbollm import LLM, SamplingParams

    llm = LLM(**engine_args)

    def generate(prompt_ids: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompt_ids, params, use_tqdm=False)

    dtype = _DTYPE_NAMES[str(llm.engine.dtype).removeprefix("torch.")]
    return generate, llm.engine.arch, dtype


def same_depth_config(arch: ModelArch) -> dict:
    """A Llama config.json with `arch`'s depth and almost no weights: a forward pass of it
    costs what a pass of `arch` costs besides reading weights and KV (Python, small ops, kernel
    calls, sampling), which the roofline does not see."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": arch.num_hidden_layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": True}


def measure_overhead(arch: ModelArch, engine_args: dict, repeats: int = 3) -> float:
    """Seconds per decode step of the engine on same_depth_config(arch) with dummy weights
    (same dtype and threads as `engine_args`): the planner's per-forward overhead."""
    import json
    import tempfile

    from turbollm.loader.resolve import bundled_model_path

    keep = {k: v for k, v in engine_args.items() if k in ("dtype", "num_threads", "device")}
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/config.json", "w") as f:
            json.dump(same_depth_config(arch), f)
        generate, _, _ = engine_generate({**keep, "model": d, "load_format": "dummy",
                                          "tokenizer": str(bundled_model_path()),
                                          "kv_cache_memory": "64MiB"})
        # 64 decode tokens: on a model this small one scheduler hiccup in the 1-token run
        # could otherwise outweigh 32 tokens of decoding and read as zero overhead
        return time_generate(generate, 512, repeats)(16, 64).decode_s_per_token


def _engine_kwargs(pairs: list[str]) -> dict:
    """['dtype=float32', 'num_threads=2'] -> {'dtype': 'float32', 'num_threads': 2}."""
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text  # a bare word: a string
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m turbollm.plan.validate`: the planner next to the engine on this machine."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for turbollm.LLM (repeatable), e.g. dtype=float32")
    p.add_argument("--quant", choices=("none", "fp8", "int8", "int4"), default="none",
                   help="weight format the engine runs (default: dense, in its dtype)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mfu", type=float)
    p.add_argument("--mbu", type=float)
    p.add_argument("--overhead-ms", type=float, default=None,
                   help="fixed cost per forward pass (default: measured, as the decode step "
                        "time of a model of the same depth with almost no weights)")
    p.add_argument("--tolerance", type=float, default=0.30)
    args = p.parse_args(argv)

    from turbollm.plan.local_hw import measure_local

    engine_args = _engine_kwargs(args.engine_arg)
    generate, arch, dtype = engine_generate(engine_args)
    gpu = measure_local()
    overhead_s = (measure_overhead(arch, engine_args) if args.overhead_ms is None
                  else args.overhead_ms / 1e3)
    weights = dtype if args.quant == "none" else args.quant
    precision = Precision(weights=weights, dtype=dtype, kv_dtype=dtype,
                          group_size=args.group_size)
    eff = Efficiency(mfu=args.mfu or gpu.default_mfu, mbu=args.mbu or gpu.mbu_for(weights),
                     overhead_s=overhead_s)
    measure = time_generate(generate, arch.vocab_size, args.repeats)
    cmp = compare_with_engine(measure, arch, gpu, precision, eff, args.prompt_len,
                              args.decode_tokens, args.tolerance)
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
