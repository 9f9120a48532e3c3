"""AWQ (Lin et al., 2023): scale up the input channels that carry large activations before int4
rounding, and fold the inverse scale into the op that produces those inputs, so the float model
is unchanged and the salient weights lose less to rounding.

Per linear, s = mean|x|^alpha (per input channel, normalized around 1); alpha is searched on a
grid to minimize || Q(W diag(s)) (x / s) - W x || on calibration rows (alpha = 0 is plain
round-to-nearest, so the search never does worse than RTN on those rows). The folds, per decoder
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
                  group_size: int, n_grid: int = 20):
    """Best per-input-channel scales s [in] for weight [out, in] on rows x [n, in]
    (act_mean [in] must already be tied where channels must share a scale).
    Returns (s, int4 weights of W * s, output error, RTN's output error)."""
    ref = x @ weight.T
    stat = act_mean.float().clamp(min=1e-4)
    best = None
    rtn_err = None
    for k in range(n_grid):
        alpha = k / n_grid
        s = stat.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, sc, z = quantize_int4_rtn(weight * s, group_size)
        out = (x / s) @ dequantize_int4(q, sc, z, group_size).T
        err = float((out - ref).pow(2).mean())
        if k == 0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (s, Int4Weights(q, sc, z, group_size), err)
    return best[0], best[1], best[2], rtn_err


def _tie_over_query_groups(stat: torch.Tensor, num_heads: int, num_kv_heads: int,
                           head_dim: int) -> torch.Tensor:
    """[q_size] -> [q_size] with the query heads that share a value head sharing their values
    (query head h reads value head h // (num_heads // num_kv_heads))."""
    g = num_heads // num_kv_heads
    kv = stat.view(num_kv_heads, g, head_dim).mean(1, keepdim=True)
    return kv.expand(num_kv_heads, g, head_dim).reshape(-1)


@torch.no_grad()
def awq_quantize_layer(layer, stats: dict, prefix: str, group_size: int, n_grid: int = 20
                       ) -> dict[str, Int4Weights]:
    """Scale search, folds and int4 for one decoder layer (module names under `prefix`)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_w = attn.qkv_proj.weight.float().clone()
    gate_up_w = mlp.gate_up_proj.weight.float().clone()
    names = {k: f"{prefix}.{k}" for k in ("self_attn.qkv_proj", "self_attn.o_proj",
                                          "mlp.gate_up_proj", "mlp.down_proj")}
    out: dict[str, Int4Weights] = {}

    # o_proj, folded into the v rows of qkv
    st = stats[names["self_attn.o_proj"]]
    tied = _tie_over_query_groups(st.abs_mean, attn.num_heads, attn.num_kv_heads, attn.head_dim)
    s, res, _, _ = search_scales(attn.o_proj.weight.float(), tied, st.sample(), group_size, n_grid)
    s_v = s.view(attn.num_kv_heads, -1, attn.head_dim)[:, 0].reshape(-1)  # [kv_size]
    v0 = attn.q_size + attn.kv_size
    qkv_w[v0:] /= s_v[:, None]
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias[v0:] /= s_v.to(attn.qkv_proj.bias.dtype)
    out[names["self_attn.o_proj"]] = res

    # down_proj, folded into the up rows of gate_up
    st = stats[names["mlp.down_proj"]]
    s, res, _, _ = search_scales(mlp.down_proj.weight.float(), st.abs_mean, st.sample(),
                                 group_size, n_grid)
    inter = mlp.down_proj.in_features
    gate_up_w[inter:] /= s[:, None]
    out[names["mlp.down_proj"]] = res

    # qkv and gate_up, folded into the norms before them
    for key, w, norm in (("self_attn.qkv_proj", qkv_w, layer.input_layernorm),
                         ("mlp.gate_up_proj", gate_up_w, layer.post_attention_layernorm)):
        st = stats[names[key]]
        s, res, _, _ = search_scales(w, st.abs_mean, st.sample(), group_size, n_grid)
        norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)
        out[names[key]] = res

    for key, res in out.items():
        install_int4_weights(layer.get_submodule(key[len(prefix) + 1:]), res)
    return out


def awq_quantize_model(model: torch.nn.Module, stats: dict, group_size: int, n_grid: int = 20,
                       progress: bool = True) -> dict[str, Int4Weights]:
    """AWQ every decoder layer of a Llama-family model in place (int4 kernels installed)."""
    layers = list(model.model.layers)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), desc="awq", unit="layer")
    results = {}
    for i, layer in enumerate(layers):
        results.update(awq_quantize_layer(layer, stats, f"model.layers.{i}", group_size, n_grid))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
