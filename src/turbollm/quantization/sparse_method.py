"""Serving pruned weights: decode rows read the bitmask-compressed form, prefill the dense one.

Two methods: SparseBitmaskMethod for dense fp32 / bf16 weights, SparseInt8Method for per-channel
int8 ones (`--quantization int8` on a pruned checkpoint: 2:4 reads 5 bits per weight where the
int8 weight reads 8).

Decode is bound by reading weights, so a 50%-sparse bf16 weight read as its kept values plus one
bit per weight (9 bits instead of 16) is what makes pruning pay. The C kernel
(quantization/csrc/sparse.c) takes up to its row limit of fp32 activation rows, from the layer
(`apply`) or from the native decode step (`row_kernel`, call kind LIN_SPARSE, LIN_SPARSE_Q8 for
int8). Prefill-sized inputs are compute-bound and go to the dense weight, which is therefore
kept as well: a sparse layer holds ~1.56x the bytes of its dense bf16 weight, ~1.6x its int8
one (measured speed, not memory, is what this buys).

Which layers (ModelConfig.sparsity): `auto` installs them on every linear with at least
MIN_ZEROS of its weights zero when the checkpoint is stored sparse (compressed-tensors), where
the kernel was measured faster than the dense weights (each method's serves_by_default), `bitmask`
on such linears of any checkpoint (e.g. one pruned and saved dense), `none` never.
"""
from __future__ import annotations

import functools

import torch

from turbollm.config import SPARSITY_MODES
from turbollm.layers import prefill_gemm as multi_row
from turbollm.layers.linear import LinearBase, UnquantizedLinearMethod
from turbollm.layers.quant_method import QuantMethod
from turbollm.quantization import kernels, sparse
from turbollm.quantization.int8 import Int8LinearMethod
from turbollm.quantization.registry import register

# Below this share of zeros the kept values plus the mask read more than a bf16 row would save
MIN_ZEROS = 0.3
@register
class SparseBitmaskMethod(QuantMethod):
    name = "sparse_bitmask"

    def __init__(self):
        self.dense = UnquantizedLinearMethod()

    @classmethod
    def create_weights(cls, layer, group_size: int = 0) -> None:
        """Add the bitmask form of the layer's dense weight (fp32 or bf16 values)."""
        layer.sparse_weight = sparse.BitmaskWeight.from_dense(layer.weight.data)
        layer.quant_method = cls()

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        decode_rows = x2.shape[0] <= _max_rows() or multi_row.is_row_invariant()
        if (x2.device.type != "cpu" or x2.dtype != torch.float32 or sparse.lib() is None
                or not decode_rows):
            return self.dense.apply(layer, x)
        # in calls of at most the kernel's row limit: each row gets the bits it gets alone, so
        # a row-invariant step (a speculative verification of more rows than the limit)
        # reproduces plain decoding
        y = sparse.bitmask_linear(x2, layer.sparse_weight)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def row_kernel(self, layer, M: int):
        """The C call for M fp32 decode rows, or None past the kernel's limit."""
        lib = sparse.lib()
        if lib is None or M > _max_rows():
            return None
        return layer.sparse_weight.row_kernel(lib, M)

    def weight_bytes(self, layer) -> int:
        return layer.weight.numel() * layer.weight.element_size() + \
            layer.sparse_weight.nbytes()

    @staticmethod
    def serves_by_default(weight: torch.Tensor, structure: str) -> bool:
        """Whether `auto` puts this method on a stored-sparse checkpoint's `weight`. The
        8-column kernel (AVX2) pays per mask byte, and every byte of a 2:4 weight holds values:
        measured on a Sapphire Rapids VM (2 threads, bundled model pruned by magnitude, bf16,
        session 18) batch-1 decode at 1.15x the dense bf16 weights for 50% unstructured but
        0.79x for 2:4, so there N:M checkpoints stay dense unless `bitmask` is asked. The
        32-column kernel (AVX-512 VBMI2) costs the same per 32 columns whatever the pattern, and
        serves both: 2:4 at 1.88x and 50% at 2.10x dense bf16 on a Zen 4 EPYC (session 20,
        docs/compression.md)."""
        return structure == "unstructured" or (structure == "2:4"
                                               and sparse.bf16_columns_per_expand() >= 32)


@register
class SparseInt8Method(SparseBitmaskMethod):
    """A pruned per-channel int8 linear: decode rows through the int8 bitmask kernel, other
    inputs through the int8 weight (kept as Int8LinearMethod installed it)."""

    name = "sparse_int8"

    def __init__(self):
        self.dense = Int8LinearMethod()

    @classmethod
    def create_weights(cls, layer, group_size: int = 0) -> None:
        """Add the bitmask form of the layer's per-channel int8 weight."""
        layer.sparse_weight = sparse.BitmaskWeight.from_dense(*kernels.int8_unpack(
            layer.int8_state))
        layer.quant_method = cls()

    def canonical(self, layer):
        return self.dense.canonical(layer)

    def weight_bytes(self, layer) -> int:
        return self.dense.weight_bytes(layer) + layer.sparse_weight.nbytes()

    @staticmethod
    def serves_by_default(weight: torch.Tensor, structure: str) -> bool:
        """Measured on a Zen 4 EPYC (2 threads, bundled model pruned by magnitude, batch-1
        decode against the dense int8 kernels, session 22): the AVX-512 VBMI kernels (64
        columns a step) 1.53x for 2:4 and 1.30x for 50% unstructured; the avx2 build's 2:4
        (fixed 4 of 8) kernel 1.33x, but its any-mask kernel 0.99x. So everywhere except
        unstructured int8 on builds without VBMI."""
        return (sparse.int8_columns_per_step() >= 64
                or sparse.int8_layout(weight != 0) != "any")


@functools.cache
def _max_rows() -> int:
    """The kernel's row limit (0 where it cannot run), asked of the library once."""
    lib = sparse.lib()
    return int(lib.bitmask_gemv_max_rows()) if lib is not None else 0


def zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def install_sparse(model: torch.nn.Module, mode: str, stored_sparse: bool,
                   structure: str = "unstructured") -> int:
    """Put SparseBitmaskMethod on the model's qualifying dense linears and SparseInt8Method on
    its per-channel int8 ones (see the module docstring); returns how many. lm_head stays as it
    is (pruning leaves it whole)."""
    if mode not in SPARSITY_MODES:
        raise ValueError(f"sparsity must be one of {SPARSITY_MODES}, got {mode!r}")
    if mode == "none" or (mode == "auto" and not stored_sparse) or sparse.lib() is None:
        return 0
    n = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or name.endswith("lm_head") or layer.in_features % 8:
            continue
        method, weight = _sparse_method_for(layer)
        if method is None or zero_fraction(weight) < MIN_ZEROS:
            continue
        if mode == "auto" and not method.serves_by_default(weight, structure):
            continue  # measured slower than the dense weights there: dense is the default
        method.create_weights(layer)
        n += 1
    return n


def _sparse_method_for(layer):
    """(the sparse method for `layer`'s weights, those weights), or (None, None)."""
    m = layer.quant_method
    if (isinstance(m, UnquantizedLinearMethod) and layer.weight is not None
            and layer.weight.device.type == "cpu"
            and layer.weight.dtype in (torch.float32, torch.bfloat16)):
        return SparseBitmaskMethod, layer.weight.data
    if type(m) is Int8LinearMethod and layer.int8_state.qweight.device.type == "cpu" \
            and layer.int8_state.group_size == layer.in_features:
        return SparseInt8Method, layer.int8_state.qweight
    return None, None
