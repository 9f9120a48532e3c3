"""Calibration shared by the pruning tools: a full-precision engine for the model, corpus
windows through it, and per-linear input statistics under Hugging Face names.

The engine's linears are fused (qkv_proj, gate_up_proj); their inputs are those of the HF
projections they hold, so one statistic serves q/k/v_proj and gate/up_proj. All layers are
calibrated from one pass of the dense model (as worker/calibration.py does for AWQ/GPTQ): one
forward per window instead of one per layer and pruned layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# fused engine linear -> the HF projections that read the same input
FUSED_TO_HF = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
               "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class CalibConfig:
    num_windows: int = 32  # --calib: windows of corpus text run through the model
    window_len: int = 256  # tokens per window
    text_file: str | None = None  # --calib-file: the user's own text instead of the corpus

    def text(self) -> str | None:
        return None if self.text_file is None else Path(self.text_file).read_text()


def calibration_llm(model: str):
    """The model in fp32 with dense weights (a GGUF file is dequantized) and a small KV cache:
    scores and statistics come from full-precision activations."""
    from turbollm import LLM
    return LLM(model, dtype="float32", quantization="none", kv_cache_memory="64MiB")


def calibration_target(llm):
    """What worker/calibration.py runs windows through: the engine's model and scoring."""
    from types import SimpleNamespace
    eng = llm.engine
    return SimpleNamespace(model=eng.executor.worker.model, tokenizer=eng.tokenizer,
                           max_model_len=eng.max_model_len, score_logits=eng.score_logits)


def windows_for(llm, calib: CalibConfig) -> list[list[int]]:
    """Calibration token windows: spread over the first 90% of the text (the rest is held out
    for perplexity)."""
    from turbollm.worker.calibration import calibration_windows, corpus_token_ids
    if llm.tokenizer is None:
        raise ValueError("calibration needs a tokenizer (the model has none)")
    ids = corpus_token_ids(llm.tokenizer, calib.text())
    return calibration_windows(ids, calib.num_windows, min(calib.window_len,
                                                            llm.engine.max_model_len))


def linear_stats(llm, calib: CalibConfig, hessian: bool, progress: bool = True) -> dict:
    """{HF linear name (model.layers.i.self_attn.q_proj, ...): LinearStats} with the input
    channel sums of squares, and X^T X when `hessian`."""
    from turbollm.worker.calibration import collect_stats, decoder_linears, window_runner
    target = calibration_target(llm)
    stats = collect_stats(window_runner(target), windows_for(llm, calib),
                          decoder_linears(target.model), hessian=hessian, abs_stats=False,
                          progress=progress, sq_stats=True)
    by_hf = {}
    for name, st in stats.items():
        prefix, _, leaf = name.rpartition(".")
        for hf_leaf in FUSED_TO_HF.get(leaf, (leaf,)):
            by_hf[f"{prefix}.{hf_leaf}"] = st
    return by_hf
