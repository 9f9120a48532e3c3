"""Greedy outputs of the bundled model in several configurations, pinned across refactors.

`python tests/engine/pinned_outputs.py` (re)writes fixtures/pinned_outputs.json from the code
as it stands; test_pinned_outputs.py checks the engine still gives exactly those tokens. The
file was written before the worker-line redesign (issue 24), so the redesign is checked against
the code before it. Each configuration is pinned under both CPU compute paths, chosen by
patching the CPU-feature probe so the same file holds on every CPU: fp32 math over 16-bit
storage (what dtype=auto computes in wherever our C kernels run, and on CPUs without bf16
instructions), and bf16 math (dtype=bfloat16 on a CPU with bf16 instructions; before issue 25
dtype=auto chose it there, and the pins were written that way).
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
PATHS = {"bf16_math": True, "fp32_math": False}


def bf16_probe(has_bf16: bool):
    """Patch the CPU probe that picks bf16 math for dtype=auto on CPU."""
    return mock.patch("turbollm.platform_info.cpu_has_native_bf16", return_value=has_bf16)


def generate(config: dict, has_bf16: bool) -> list[list[int]]:
    from turbollm import LLM, SamplingParams
    if has_bf16:  # bf16 math is what dtype=bfloat16 asks for (the checkpoint's storage too)
        config = {"dtype": "bfloat16", **config}
    with bf16_probe(has_bf16):
        llm = LLM(kv_cache_memory="64MiB", max_model_len=512, **config)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    result = {path: {name: generate(cfg, has_bf16) for name, cfg in CONFIGS.items()}
              for path, has_bf16 in PATHS.items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
