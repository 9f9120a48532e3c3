"""Memory: weight bytes per format, KV bytes per token, activation reserve, fit and max batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

from turbollm.model_arch import ModelArch
from turbollm.plan.setup import Precision, Setup, Workload
from turbollm.sizing import dtype_bytes, kv_cache_bytes_per_token

_FP16, _FP32 = 2, 4


def linear_shapes(arch: ModelArch) -> list[tuple[int, int]]:
    """(in_features, out_features) of each projection matrix of one decoder layer."""
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    attn = [(h, q), (h, kv), (h, kv), (q, h)]
    mlp = [(h, inter), (h, inter), (inter, h)] if arch.gated_mlp else [(h, inter), (inter, h)]
    return attn + mlp


def matrix_bytes(in_f: int, out_f: int, fmt: str, group_size: int = 128) -> float:
    """Bytes of one weight matrix stored in `fmt`, quantization scales included."""
    n = in_f * out_f
    if fmt == "int4":
        # two 4-bit values per byte + one fp16 scale and one fp16 zero per group of inputs
        return n / 2 + out_f * math.ceil(in_f / group_size) * 2 * _FP16
    if fmt == "int8":
        return n + out_f * _FP16  # symmetric, one fp16 scale per output channel
    if fmt == "fp8":
        return n + out_f * _FP32  # one fp32 scale per output channel
    return n * dtype_bytes(fmt)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes of the whole model, by part."""

    linear: float  # projection matrices of all layers, quantization scales included
    embedding: float  # token embedding table (kept in the activation dtype)
    lm_head: float  # output projection; 0 when tied to the embedding
    other: float  # norms and biases (replicated on every GPU)
    tied: bool

    @property
    def total(self) -> float:
        return self.linear + self.embedding + self.lm_head + self.other

    def per_gpu(self, tp: int) -> float:
        """Bytes each of `tp` GPUs holds: matrices and vocab are split, norms replicated."""
        return (self.linear + self.embedding + self.lm_head) / tp + self.other

    def read_per_step(self, tp: int) -> float:
        """Bytes one forward pass streams per GPU: all matrices and the output projection,
        but not the embedding table, of which a lookup reads only a few rows."""
        head = self.embedding if self.tied else self.lm_head
        return (self.linear + head) / tp + self.other


def weight_bytes(arch: ModelArch, precision: Precision) -> WeightBytes:
    """Weight bytes of `arch` with linear layers in `precision.weights` (rest in dtype)."""
    per_layer = sum(matrix_bytes(i, o, precision.weights, precision.group_size)
                    for i, o in linear_shapes(arch))
    act = dtype_bytes(precision.dtype)
    embed = arch.vocab_size * arch.hidden_size * act
    # two norm vectors per layer + the final norm; q/k/v biases where the config has them
    small = arch.num_hidden_layers * 2 * arch.hidden_size + arch.hidden_size
    if arch.attention_bias:
        small += arch.num_hidden_layers * (arch.q_size + 2 * arch.kv_size)
    return WeightBytes(
        linear=arch.num_hidden_layers * per_layer,
        embedding=embed,
        lm_head=0.0 if arch.tie_word_embeddings else embed,
        other=small * act,
        tied=arch.tie_word_embeddings,
    )


def kv_scale_bytes(kv_dtype: str) -> int:
    """Per-token, per-head scale bytes of a quantized cache: int8 keeps an fp16 scale;
    fp8 uses one per-tensor scale, which is negligible."""
    return _FP16 if kv_dtype == "int8" else 0


def kv_bytes_per_token(arch: ModelArch, kv_dtype: str, tp: int = 1) -> int:
    """KV-cache bytes of one token on one of `tp` GPUs (the engine's sizing function)."""
    total = kv_cache_bytes_per_token(arch, kv_dtype, kv_scale_bytes(kv_dtype))
    # KV heads are split over GPUs; with more GPUs than KV heads each GPU keeps a replica.
    heads_per_gpu = math.ceil(arch.num_key_value_heads / tp)
    return total * heads_per_gpu // arch.num_key_value_heads


def activation_bytes(setup: Setup) -> float:
    """Per-GPU reserve for the activations of the largest forward pass.

    A pass of `max_batched_tokens` tokens holds the residual stream and its normed copy,
    the local q/k/v and MLP intermediate, plus fp32 logits for `max_num_seqs` sequences.
    """
    a, tp = setup.arch, setup.n_gpus
    mlp = (2 if a.gated_mlp else 1) * a.intermediate_size
    per_token = 2 * a.hidden_size + (a.q_size + 2 * a.kv_size + mlp) / tp
    tokens = setup.max_batched_tokens
    return tokens * per_token * dtype_bytes(setup.precision.dtype) + \
        setup.max_num_seqs * a.vocab_size * _FP32


@dataclass(frozen=True)
class MemoryPlan:
    """Where each GPU's memory goes for a workload, and what fits."""

    weights_total: float  # bytes, whole model
    weights_per_gpu: float
    kv_per_token: int  # bytes, whole model (all GPUs)
    kv_per_token_per_gpu: int
    activation_per_gpu: float  # reserve for the largest forward pass
    usable_per_gpu: float  # device memory x gpu_mem_util
    kv_budget_per_gpu: float  # what is left for the KV cache (may be negative)
    context_len: int  # tokens per sequence the batch is sized for
    kv_needed_per_gpu: float  # KV bytes of the whole batch at that context
    max_batch: int  # largest batch whose KV fits at context_len
    fits_weights: bool  # weights + activations fit
    fits: bool  # ... and the workload's KV cache too


def memory_plan(setup: Setup, workload: Workload, context_len: int | None = None) -> MemoryPlan:
    """Memory per GPU for `workload`; `context_len` defaults to prompt + completion."""
    tp = setup.n_gpus
    wb = weight_bytes(setup.arch, setup.precision)
    kv_tok = kv_bytes_per_token(setup.arch, setup.precision.kv_dtype)
    kv_tok_gpu = kv_bytes_per_token(setup.arch, setup.precision.kv_dtype, tp)
    act = activation_bytes(setup)
    usable = setup.gpu.memory_bytes * setup.gpu_mem_util
    budget = usable - wb.per_gpu(tp) - act
    ctx = context_len or workload.context_len
    needed = workload.batch * ctx * kv_tok_gpu
    max_batch = max(0, int(budget // (ctx * kv_tok_gpu))) if budget > 0 else 0
    return MemoryPlan(
        weights_total=wb.total, weights_per_gpu=wb.per_gpu(tp), kv_per_token=kv_tok,
        kv_per_token_per_gpu=kv_tok_gpu, activation_per_gpu=act, usable_per_gpu=usable,
        kv_budget_per_gpu=budget, context_len=ctx, kv_needed_per_gpu=needed,
        max_batch=max_batch, fits_weights=budget > 0, fits=budget >= needed and budget > 0,
    )
