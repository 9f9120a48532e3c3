"""Serving pruned weights: decode rows read the bitmask-compressed form, prefill the dense one.

Decode is bound by reading weights, so a 50%-sparse bf16 weight read as its kept values plus one
bit per weight (9 bits instead of 16) is what makes pruning pay. The C kernel
(quantization/csrc/sparse.c) takes up to its row limit of fp32 activation rows, from the layer
(`apply`) or from the native decode step (`row_kernel`, call kind LIN_SPARSE). Prefill-sized
inputs are compute-bound and go to the dense weight, which is therefore kept as well: a sparse
layer holds ~1.56x the bytes of its dense bf16 weight (measured speed, not memory, is what this
buys).

Which layers (ModelConfig.sparsity): `auto` installs it on every dense linear with at least
MIN_ZEROS of its weights zero when the checkpoint is stored sparse and unstructured
(compressed-tensors sparse-bitmask; 2:4 too where the kernel expands 32 columns at a time,
see auto_structures), `bitmask` does the
same for any checkpoint (e.g. one pruned and saved dense, or 2:4), `none` never.
"""
from __future__ import annotations

import functools

import torch

from turbollm.config import SPARSITY_MODES
from turbollm.layers.linear import LinearBase, UnquantizedLinearMethod
from turbollm.layers.quant_method import QuantMethod
from turbollm.native_build import RowKernel
from turbollm.quantization import sparse
from turbollm.quantization.kernels import _run_row_kernel
from turbollm.quantization.registry import register

# Below this share of zeros the kept values plus the mask read more than a bf16 row would save
MIN_ZEROS = 0.3
# Stored sparsity structures `auto` serves through the kernel. The 8-column kernel (AVX2) pays
# per mask byte, and every byte of a 2:4 weight holds values: measured on a Sapphire Rapids VM
# (2 threads, bundled model pruned by magnitude, bf16, session 18) batch-1 decode at 1.15x the
# dense bf16 weights for 50% unstructured but 0.79x for 2:4, so there N:M checkpoints stay
# dense unless `bitmask` is asked. The 32-column kernel (AVX-512 VBMI2) costs the same per 32
# columns whatever the pattern, and serves both: 2:4 at 1.88x and 50% at 2.10x dense bf16 on a
# Zen 4 EPYC (session 20, docs/compression.md).
def auto_structures() -> tuple[str, ...]:
    if sparse.bf16_columns_per_expand() >= 32:
        return ("unstructured", "2:4")
    return ("unstructured",)


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
        kernel = (self.row_kernel(layer, x2.shape[0])
                  if x2.device.type == "cpu" and x2.dtype == torch.float32 else None)
        if kernel is None:
            return self.dense.apply(layer, x)
        y = _run_row_kernel(kernel, x2, layer.out_features)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def row_kernel(self, layer, M: int):
        """The C call for M fp32 decode rows (LIN_SPARSE), or None past the kernel's limit."""
        lib = sparse.lib()
        if lib is None or M > _max_rows():
            return None
        w = layer.sparse_weight
        fn = lib.bitmask_gemv_f32 if w.values.dtype == torch.float32 else lib.bitmask_gemv_bf16
        n, k = w.shape
        v, m, o = w.values.data_ptr(), w.mask.data_ptr(), w.row_offsets.data_ptr()
        return RowKernel(lambda x, y: fn(x, M, v, m, o, y, n, k), fn, RowKernel.SPARSE,
                         M, v, m, o, n, k)

    def weight_bytes(self, layer) -> int:
        return layer.weight.numel() * layer.weight.element_size() + \
            layer.sparse_weight.nbytes()


@functools.cache
def _max_rows() -> int:
    """The kernel's row limit (0 where it cannot run), asked of the library once."""
    lib = sparse.lib()
    return int(lib.bitmask_gemv_max_rows()) if lib is not None else 0


def zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def install_sparse(model: torch.nn.Module, mode: str, stored_sparse: bool,
                   structure: str = "unstructured") -> int:
    """Put SparseBitmaskMethod on the model's qualifying linears (see the module docstring);
    returns how many. lm_head stays dense (pruning leaves it whole)."""
    if mode not in SPARSITY_MODES:
        raise ValueError(f"sparsity must be one of {SPARSITY_MODES}, got {mode!r}")
    if mode == "none" or (mode == "auto" and not stored_sparse) or sparse.lib() is None:
        return 0
    if mode == "auto" and structure not in auto_structures():
        return 0  # measured slower than the dense weights: dense is the default there
    n = 0
    for name, layer in model.named_modules():
        if (not isinstance(layer, LinearBase) or name.endswith("lm_head")
                or not isinstance(layer.quant_method, UnquantizedLinearMethod)
                or layer.weight is None or layer.weight.device.type != "cpu"
                or layer.weight.dtype not in (torch.float32, torch.bfloat16)
                or layer.in_features % 8 or zero_fraction(layer.weight.data) < MIN_ZEROS):
            continue
        SparseBitmaskMethod.create_weights(layer)
        n += 1
    return n
