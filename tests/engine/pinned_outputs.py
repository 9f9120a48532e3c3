"""Greedy outputs of the bundled model in several configurations, pinned across refactors.

`python tests/engine/pinned_outputs.py` (re)writes fixtures/pinned_outputs.json from the code
as it stands; test_pinned_outputs.py checks the engine still gives exactly those tokens. The
file was written before the worker-line redesign (issue 24), so the redesign is checked against
the code before it. Each configuration is pinned under both CPU compute paths, chosen by
patching the CPU-feature probe so the same file holds on every CPU: fp32 math over 16-bit
storage (what dtype=auto computes in wherever our C kernels run, and on CPUs without bf16
instructions), and bf16 math (dtype=bfloat16 on a CPU with bf16 instructions; before issue 25
dtype=auto chose it there, and the pins were written that way). A third set, written after
issue 25 gave AMX CPUs bf16 tiles for prefill-sized products, pins dtype=auto on AMX CPUs
(fp32 decode, bf16 prefill); it runs only where the CPU has AMX.

torch's bf16 matmuls sum in an order set by the CPU's oneDNN kernel. The bf16_math pins were
written on an AVX2 EPYC (bf16 widened to fp32) and hold on AMX CPUs too, but AVX-512 BF16
without AMX (vdpbf16ps sums each pair of products first: Zen 4) tips near-ties the other way
(session 20: 4 of the 6 configurations). That family has pins of its own, written on such a
CPU from the code after the redesign (so they guard later changes only); `pin_key` picks them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

FIXTURE = Path(__file__).parent / "fixtures" / "pinned_outputs.json"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.\nPaste this text back: the sea is calm and blue today.",
]
MAX_TOKENS = 20
CONFIGS = {
    "default": {},
    "fp32": {"dtype": "float32"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "spec_ngram": {"speculative_method": "ngram", "num_speculative_tokens": 4,
                   "verify_cost": "0.25"},
    "spec_draft": {"speculative_method": "draft", "draft_layers": 8,
                   "num_speculative_tokens": 3, "verify_cost": "0.25"},
}
# path -> (the bf16 probe's answer, dtype asked for where a configuration names none)
PATHS = {"bf16_math": (True, "bfloat16"), "fp32_math": (False, "auto"),
         "amx_prefill": (True, "auto")}
# Paths that need a CPU feature (the probe cannot fake AMX tiles), and the kernel variant
NEEDS_ISA = {"amx_prefill": "amx"}


def pin_key(path: str) -> str:
    """The fixture entry `path` is checked against on this CPU (see the module docstring)."""
    from turbollm.platform_info import cpu_flags
    flags = cpu_flags()
    if path == "bf16_math" and "avx512_bf16" in flags and "amx_bf16" not in flags:
        return "bf16_math@avx512_bf16"
    return path


def bf16_probe(has_bf16: bool):
    """Patch the CPU probe that picks bf16 math for dtype=auto on CPU."""
    return mock.patch("turbollm.platform_info.cpu_has_native_bf16", return_value=has_bf16)


def generate(config: dict, path: str) -> list[list[int]]:
    from turbollm import LLM, SamplingParams
    has_bf16, dtype = PATHS[path]
    config = {"dtype": dtype, **config}  # bf16 math is what dtype=bfloat16 asks for
    with bf16_probe(has_bf16):
        llm = LLM(kv_cache_memory="64MiB", max_model_len=512, **config)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    """Rewrite the paths named on the command line (default: all) as this CPU keys them
    (pin_key), keep the others."""
    paths = sys.argv[1:] or list(PATHS)
    result = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    for path in paths:
        result[pin_key(path)] = {name: generate(cfg, path) for name, cfg in CONFIGS.items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
