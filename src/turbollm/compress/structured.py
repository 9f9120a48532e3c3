"""`turbollm prune --structured width=F | depth=N`: a smaller dense model, not a sparse one.

width=F removes, in every decoder layer, the fraction F of
- attention: whole KV groups (a key/value head and the query heads that read it), so the model
  stays a valid grouped-query attention model; a group's importance is the squared L2 norm of
  its heads' outputs (the o_proj input) over the calibration tokens, as Minitron scores heads;
- MLP: intermediate channels, scored by the L2 norm of their activation (the down_proj input).
Each layer keeps its own most important groups and channels, but the same number of them (an
HF config has one head count and one intermediate size). Heads are whole KV groups, so the kept
count is rounded: SmolLM2's 3 KV groups at width=0.25 keep 2. The hidden size is not pruned.

depth=N removes the N decoder layers that change the hidden state least: the highest mean cosine
similarity between a layer's input and output hidden states over the calibration tokens
(ShortGPT's "block influence", ranked once on the dense model).

Both write config.json to match the tensors (head_dim stays explicit, since hidden_size /
num_attention_heads no longer gives it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from turbollm.compress.calib import CalibConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass
class StructuredConfig:
    kind: str  # "width" | "depth"
    amount: float  # width: fraction removed; depth: number of layers removed

    @classmethod
    def parse(cls, spec: str) -> "StructuredConfig":
        """'width=0.25' / 'depth=4'."""
        kind, _, value = spec.partition("=")
        try:
            if kind == "width":
                cfg = cls("width", float(value))
                if not 0 < cfg.amount < 1:
                    raise ValueError
                return cfg
            if kind == "depth":
                cfg = cls("depth", int(value))
                if cfg.amount < 1:
                    raise ValueError
                return cfg
        except ValueError:
            pass
        raise ValueError(f"--structured takes width=F (0 < F < 1) or depth=N (N >= 1), "
                         f"got {spec!r}")


def _kept(n: int, width: float, multiple: int = 1) -> int:
    keep = round(n * (1 - width) / multiple) * multiple
    return max(multiple, min(n, keep))


@torch.no_grad()
def width_prune(tensors: dict[str, torch.Tensor], hf_config: dict, arch, stats: dict,
                width: float) -> tuple[dict, dict]:
    """Tensors and config of the width-pruned model; `stats` from calib.linear_stats."""
    H, K, D = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    G, inter = H // K, arch.intermediate_size
    keep_kv = _kept(K, width)
    keep_i = _kept(inter, width, 32 if inter >= 128 else 1)  # kernel-friendly widths
    out = dict(tensors)
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}"
        head_sq = stats[f"{p}.self_attn.o_proj"].sq_sum.view(K, G, D).sum((1, 2))
        groups = head_sq.topk(keep_kv).indices.sort().values
        heads = (groups[:, None] * G + torch.arange(G)).reshape(-1)
        q_rows = (heads[:, None] * D + torch.arange(D)).reshape(-1)
        kv_rows = (groups[:, None] * D + torch.arange(D)).reshape(-1)
        chan = stats[f"{p}.mlp.down_proj"].sq_sum.topk(keep_i).indices.sort().values
        for name, rows in ((f"{p}.self_attn.q_proj", q_rows), (f"{p}.self_attn.k_proj", kv_rows),
                           (f"{p}.self_attn.v_proj", kv_rows), (f"{p}.mlp.gate_proj", chan),
                           (f"{p}.mlp.up_proj", chan)):
            out[f"{name}.weight"] = tensors[f"{name}.weight"][rows].contiguous()
            if f"{name}.bias" in tensors:
                out[f"{name}.bias"] = tensors[f"{name}.bias"][rows].contiguous()
        out[f"{p}.self_attn.o_proj.weight"] = tensors[f"{p}.self_attn.o_proj.weight"][:, q_rows]
        out[f"{p}.mlp.down_proj.weight"] = tensors[f"{p}.mlp.down_proj.weight"][:, chan]
    config = dict(hf_config, num_attention_heads=keep_kv * G, num_key_value_heads=keep_kv,
                  head_dim=D, intermediate_size=keep_i)
    return out, config


def layer_similarity(llm, calib: CalibConfig, progress: bool = True) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output hidden states
    over the calibration tokens: [num_layers]."""
    from turbollm.compress.calib import calibration_target, windows_for
    from turbollm.worker.calibration import window_runner
    target = calibration_target(llm)
    layers = list(target.model.model.layers)
    sums = [0.0] * len(layers)
    rows = [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args):
            inputs[i] = args[1].detach().float()  # forward(rope, h, kv_cache, meta)
        return hook

    def post(i):
        def hook(module, args, output):
            h_in, h_out = inputs.pop(i), output.detach().float()
            cos = torch.nn.functional.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]),
                                                        h_out.reshape(-1, h_out.shape[-1]))
            sums[i] += float(cos.sum())
            rows[i] += cos.numel()
        return hook

    handles = [m.register_forward_pre_hook(pre(i)) for i, m in enumerate(layers)]
    handles += [m.register_forward_hook(post(i)) for i, m in enumerate(layers)]
    run = window_runner(target)
    from tqdm import tqdm
    try:
        with torch.no_grad():
            for w in tqdm(windows_for(llm, calib), desc="layer similarity", unit="window",
                          disable=not progress):
                run(w)
    finally:
        for h in handles:
            h.remove()
    return [s / max(1, n) for s, n in zip(sums, rows)]


def depth_prune(tensors: dict[str, torch.Tensor], hf_config: dict, drop: list[int]
                ) -> tuple[dict, dict]:
    """Tensors and config without the decoder layers in `drop`, the rest renumbered."""
    n = int(hf_config["num_hidden_layers"])
    kept = [i for i in range(n) if i not in set(drop)]
    if not kept:
        raise ValueError(f"depth pruning would remove all {n} layers")
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(1)) in new_index:
            out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = t
    config = dict(hf_config, num_hidden_layers=len(kept))
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (newer HF)
        config["layer_types"] = [config["layer_types"][i] for i in kept]
    return out, config


def structured_prune_model(model: str, spec: StructuredConfig, out_dir,
                           calib: CalibConfig | None = None, dtype: str = "auto",
                           progress: bool = True) -> tuple[Path, str]:
    """Write the width- or depth-pruned model; returns (DIR, a one-line summary)."""
    from turbollm.compress.calib import calibration_llm, linear_stats
    from turbollm.compress.model_out import output_dtype, write_model_dir
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import iter_checkpoint, read_arch
    calib = calib or CalibConfig()
    source = resolve_model(model, "auto")
    if source.kind == "preset":
        raise ValueError(f"{model!r} is a config preset without weights: nothing to prune")
    arch, hf_config = read_arch(source)
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    llm = calibration_llm(model)
    tensors = dict(iter_checkpoint(source, torch.float32))
    if spec.kind == "width":
        stats = linear_stats(llm, calib, hessian=False, progress=progress)
        tensors, config = width_prune(tensors, hf_config, arch, stats, spec.amount)
        summary = (f"kept {config['num_key_value_heads']}/{arch.num_key_value_heads} KV groups, "
                   f"{config['intermediate_size']}/{arch.intermediate_size} MLP channels")
    else:
        n = int(spec.amount)
        if n >= arch.num_hidden_layers:
            raise ValueError(f"depth={n} would remove all {arch.num_hidden_layers} layers")
        sim = layer_similarity(llm, calib, progress)
        drop = sorted(sorted(range(len(sim)), key=lambda i: -sim[i])[:n])
        tensors, config = depth_prune(tensors, hf_config, drop)
        summary = f"removed layers {drop} (cosine in/out {', '.join(f'{sim[i]:.3f}' for i in drop)})"
    dt = output_dtype(dtype, hf_config)
    return write_model_dir(out_dir, tensors, config, llm.tokenizer, dt), summary
