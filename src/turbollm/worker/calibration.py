"""Calibration for AWQ and GPTQ: token windows from the built-in corpus, and per-linear input
statistics gathered with forward hooks while the full-precision model runs.

A calibration `target` is anything with `model`, `tokenizer`, `max_model_len` and
`score_logits(token_ids)`: the Worker at start-up (`--quantization awq|gptq`), or a built
engine's worker model with the engine's scoring (tests, `turbollm quantize`).

All layers are calibrated from one pass of the unquantized model (not layer by layer on the
outputs of already-quantized layers, as the GPTQ/AWQ papers do): one pass costs one forward per
window instead of one per layer, and it already beats round-to-nearest clearly (docs/quantization.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from turbollm.layers.linear import LinearBase

log = logging.getLogger(__name__)

# Calibration windows come from the first 90% of the corpus tokens; the last 10% stays unseen,
# so perplexity measured there is held out.
CALIBRATION_FRACTION = 0.9


def corpus_token_ids(tokenizer, text: str | None = None) -> list[int]:
    from turbollm.corpus import builtin_corpus_text
    text = builtin_corpus_text() if text is None else text
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def calibration_windows(token_ids: list[int], num_windows: int, window_len: int,
                        fraction: float = CALIBRATION_FRACTION) -> list[list[int]]:
    """`num_windows` windows of `window_len` tokens, evenly spread over the first `fraction`
    of `token_ids` (deterministic: the same model calibrates the same way every time)."""
    usable = int(len(token_ids) * fraction)
    if usable < window_len:
        raise ValueError(f"calibration needs {window_len} tokens, the text has {usable}")
    last_start = usable - window_len
    starts = [round(i * last_start / max(1, num_windows - 1)) for i in range(num_windows)]
    return [token_ids[s:s + window_len] for s in starts]


def heldout_token_ids(token_ids: list[int], fraction: float = CALIBRATION_FRACTION) -> list[int]:
    """The corpus tokens calibration never sees."""
    return token_ids[int(len(token_ids) * fraction):]


@dataclass
class LinearStats:
    """What calibration keeps of one linear layer's inputs."""

    hessian: torch.Tensor | None = None  # sum of x x^T over rows [in, in] (GPTQ)
    abs_sum: torch.Tensor | None = None  # sum of |x| per input channel [in] (AWQ)
    sq_sum: torch.Tensor | None = None  # sum of x^2 per input channel [in] (Wanda, pruning)
    samples: list[torch.Tensor] = field(default_factory=list)  # some input rows (AWQ search)
    rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.rows)

    @property
    def channel_norm(self) -> torch.Tensor:
        """||X[:, j]||_2 over every calibration row, per input channel: [in]."""
        return self.sq_sum.sqrt()

    @property
    def mean_hessian(self) -> torch.Tensor:
        return self.hessian / max(1, self.rows)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def decoder_linears(model: torch.nn.Module) -> dict[str, LinearBase]:
    """The quantizable linears: every LinearBase inside the decoder layers (not lm_head, whose
    weight is often the tied embedding)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LinearBase) and ".layers." in f".{name}"}


def collect_stats(run_window, windows: list[list[int]], linears: dict[str, LinearBase],
                  hessian: bool, abs_stats: bool, sample_rows_per_window: int = 0,
                  progress: bool = True, sq_stats: bool = False) -> dict[str, LinearStats]:
    """Run every window through `run_window(token_ids)` with hooks on `linears` and return
    their input statistics (fp32, on the layers' device)."""
    stats = {name: LinearStats() for name in linears}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = stats[name]
            if hessian:
                st.hessian = x.T @ x if st.hessian is None else st.hessian.addmm_(x.T, x)
            if abs_stats:
                a = x.abs().sum(0)
                st.abs_sum = a if st.abs_sum is None else st.abs_sum.add_(a)
            if sq_stats:
                q = x.square().sum(0)
                st.sq_sum = q if st.sq_sum is None else st.sq_sum.add_(q)
            if sample_rows_per_window:
                step = max(1, x.shape[0] // sample_rows_per_window)
                st.samples.append(x[::step][:sample_rows_per_window].clone())
            st.rows += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(windows), desc="calibrating", unit="window")
    try:
        with torch.no_grad():  # not inference_mode: the sums are updated in place later
            for w in windows:
                run_window(w)
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    return stats


def window_runner(target):
    """A function running token ids through the target's model, skipping the vocab projection
    (calibration only needs the decoder layers' inputs; the head is most of a 135M model's
    FLOPs per token)."""
    model = target.model

    def run(token_ids: list[int]) -> None:
        # An instance attribute shadows the method for this call only.
        model.compute_logits = lambda hidden: hidden[:, :1]
        try:
            target.score_logits(token_ids)
        finally:
            del model.compute_logits
    return run


def apply_calibrated_quantization(target, method: str, group_size: int,
                                  num_windows: int = 32, window_len: int = 256,
                                  progress: bool = True, text: str | None = None,
                                  **method_kwargs) -> dict:
    """Calibrate on the built-in corpus (or `text`), then quantize the target's decoder linears
    to int4 with AWQ or GPTQ in place. Returns {layer name: int4 result}."""
    if target.tokenizer is None:
        raise ValueError(f"{method} calibration needs a tokenizer (the model has none)")
    window_len = min(window_len, target.max_model_len)
    ids = corpus_token_ids(target.tokenizer, text)
    windows = calibration_windows(ids, num_windows, window_len)
    model = target.model
    linears = decoder_linears(model)
    if any(m.weight is None for m in linears.values()):
        raise ValueError(f"{method} needs the dense weights, but the model's linears are already "
                         f"quantized (a GGUF file is served natively: load it with quantization "
                         f"'{method}' or 'none')")
    from turbollm.quantization.int4_result import model_group_size
    g = model_group_size((m.in_features for m in linears.values()), group_size)
    if g != group_size:
        log.warning("%s: group size %d does not divide the input widths; using %d",
                    method, group_size, g)
    group_size = g
    run = window_runner(target)
    if method == "gptq":
        from turbollm.quantization.gptq import gptq_quantize_model
        stats = collect_stats(run, windows, linears, hessian=True, abs_stats=False,
                              progress=progress)
        return gptq_quantize_model(model, stats, group_size, progress=progress, **method_kwargs)
    if method == "awq":
        from turbollm.quantization.awq import awq_quantize_model
        per_window = max(1, 512 // num_windows)  # ~512 rows per layer for the scale search
        stats = collect_stats(run, windows, linears, hessian=False, abs_stats=True,
                              sample_rows_per_window=per_window, progress=progress)
        return awq_quantize_model(model, stats, group_size, progress=progress, **method_kwargs)
    raise ValueError(f"unknown calibrated quantization method {method!r} (awq or gptq)")


def quantize_at_load(target, method: str, group_size: int) -> None:
    """`--quantization awq|gptq`: calibrate and quantize, unless the checkpoint already came
    quantized (an AutoAWQ/GPTQ directory loads as it is)."""
    own = getattr(target.model, "checkpoint_quantization", None)
    if own is not None:
        if own != method:
            log.warning("the checkpoint is already %s-quantized; serving it as it is, not %s",
                        own, method)
        return
    import time
    t0 = time.perf_counter()
    apply_calibrated_quantization(target, method, group_size)
    log.info("%s int4 calibration and quantization took %.1fs", method,
             time.perf_counter() - t0)
