"""AWQ (Lin et al., 2023): scale up the input channels that carry large activations before int4
rounding, and fold the inverse scale into the op that produces those inputs, so the float model
is unchanged and the salient weights lose less to rounding.

Per linear, s = mean|x|^alpha (per input channel, normalized around 1); alpha is searched on a
grid to minimize || Q(W diag(s)) (x / s) - W x || on calibration rows (alpha = 0 is plain
round-to-nearest, so the search never does worse than RTN on what it scores). The folds, per decoder
layer:
    qkv_proj  <- input_layernorm.weight / s
    gate_up   <- post_attention_layernorm.weight / s
    down_proj <- up rows of gate_up / s         (silu(gate) * up is linear in up)
    o_proj    <- v rows of qkv / s               (attention output is linear in v)
With grouped-query attention several query heads read one value head, so o_proj's scale is tied
across the query heads of a group (the statistic is averaged over them) — one scale per value
channel. o_proj and down_proj go first because their folds change qkv and gate_up weights, which
are then searched and quantized in their folded form.
"""
from __future__ import annotations

import torch

from turbollm.quantization.int4 import dequantize_int4, quantize_int4_rtn
from turbollm.quantization.int4_result import Int4Weights, install_int4_weights


def search_scales(weight: torch.Tensor, act_mean: torch.Tensor, x: torch.Tensor,
                  group_size: int, n_grid: int = 20, search_rows: int = 256):
    """Best per-input-channel scales s [in] for weight [out, in] on rows x [n, in]
    (act_mean [in] must already be tied where channels must share a scale).
    The search scores an evenly spaced subset of `search_rows` output rows — s is shared by all
    rows, so a subset ranks the grid the same at a fraction of the cost.
    Returns (s, int4 weights of the whole W * s, search error, RTN's search error)."""
    rows = torch.linspace(0, weight.shape[0] - 1, min(search_rows, weight.shape[0])).long()
    w = weight[rows]
    ref = x @ w.T
    stat = act_mean.float().clamp(min=1e-4)
    best_s, best_err, rtn_err = None, None, None
    for k in range(n_grid):
        alpha = k / n_grid
        s = stat.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, sc, z = quantize_int4_rtn(w * s, group_size)
        out = (x / s) @ dequantize_int4(q, sc, z, group_size).T
        err = float((out - ref).pow(2).mean())
        if k == 0:
            rtn_err = err
        if best_err is None or err < best_err:
            best_s, best_err = s, err
    q, sc, z = quantize_int4_rtn(weight * best_s, group_size)
    return best_s, Int4Weights(q, sc, z, group_size), best_err, rtn_err


def _tie_over_query_groups(stat: torch.Tensor, num_heads: int, num_kv_heads: int,
                           head_dim: int) -> torch.Tensor:
    """[q_size] -> [q_size] with the query heads that share a value head sharing their values
    (query head h reads value head h // (num_heads // num_kv_heads))."""
    g = num_heads // num_kv_heads
    kv = stat.view(num_kv_heads, g, head_dim).mean(1, keepdim=True)
    return kv.expand(num_kv_heads, g, head_dim).reshape(-1)


@torch.no_grad()
def awq_quantize_layer(layer, stats: dict, prefix: str, group_size: int, n_grid: int = 20,
                       fold_only: bool = False) -> dict[str, Int4Weights]:
    """Scale search, folds and int4 for one decoder layer (module names under `prefix`).
    fold_only: leave the scaled weights dense instead (the float model must not change: a test
    of the folds)."""
    attn, mlp = layer.self_attn, layer.mlp
    weights = {"self_attn.qkv_proj": attn.qkv_proj.weight.float().clone(),
               "self_attn.o_proj": attn.o_proj.weight.float(),
               "mlp.gate_up_proj": mlp.gate_up_proj.weight.float().clone(),
               "mlp.down_proj": mlp.down_proj.weight.float()}
    scales, out = {}, {}

    def search(key, act_mean):
        st = stats[f"{prefix}.{key}"]
        s, res, _, _ = search_scales(weights[key], act_mean, st.sample(), group_size, n_grid)
        scales[key], out[f"{prefix}.{key}"] = s, res
        return s

    # o_proj, folded into the v rows of qkv (one scale per value channel)
    st = stats[f"{prefix}.self_attn.o_proj"]
    s = search("self_attn.o_proj", _tie_over_query_groups(
        st.abs_mean, attn.num_heads, attn.num_kv_heads, attn.head_dim))
    s_v = s.view(attn.num_kv_heads, -1, attn.head_dim)[:, 0].reshape(-1)  # [kv_size]
    v0 = attn.q_size + attn.kv_size
    weights["self_attn.qkv_proj"][v0:] /= s_v[:, None]
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias[v0:] /= s_v.to(attn.qkv_proj.bias.dtype)

    # down_proj, folded into the up rows of gate_up
    s = search("mlp.down_proj", stats[f"{prefix}.mlp.down_proj"].abs_mean)
    weights["mlp.gate_up_proj"][mlp.down_proj.in_features:] /= s[:, None]

    # qkv and gate_up (searched in their folded form), folded into the norms before them
    for key, norm in (("self_attn.qkv_proj", layer.input_layernorm),
                      ("mlp.gate_up_proj", layer.post_attention_layernorm)):
        s = search(key, stats[f"{prefix}.{key}"].abs_mean)
        norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)

    for key, s in scales.items():
        lin = layer.get_submodule(key)
        if fold_only:
            lin.weight.data = (weights[key] * s).to(lin.weight.dtype)
        else:
            install_int4_weights(lin, out[f"{prefix}.{key}"])
    return out


def awq_quantize_model(model: torch.nn.Module, stats: dict, group_size: int, n_grid: int = 20,
                       progress: bool = True, fold_only: bool = False
                       ) -> dict[str, Int4Weights]:
    """AWQ every decoder layer of a Llama-family model in place (int4 kernels installed)."""
    layers = list(model.model.layers)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), desc="awq", unit="layer")
    results = {}
    for i, layer in enumerate(layers):
        results.update(awq_quantize_layer(layer, stats, f"model.layers.{i}", group_size, n_grid,
                                          fold_only))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
