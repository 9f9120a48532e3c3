"""The bitmask sparse GEMV (quantization/csrc/sparse.c) against torch on random sparse weights:
fp32, bf16 and int8 values, unstructured, 2:4 and 4:8 masks, empty rows and bytes, several row
counts, on every ISA build this CPU runs."""
from __future__ import annotations

import pytest
import torch

from turbollm.native_build import supported_isas
from turbollm.quantization.int8 import dequantize_int8, quantize_int8
from turbollm.quantization.sparse import (BitmaskWeight, bf16_columns_per_expand, bitmask_linear,
                                          int8_columns_per_step, lib)

pytestmark = pytest.mark.skipif(lib() is None, reason="no C kernels on this machine")
# avx2 expands 8 columns with a permutation table, avx512/amx 16 with AVX-512 expands (the
# K % 64 tail on the 8-column path): test each build this CPU runs
ISAS = supported_isas()


def _weight(out_f, in_f, density, dtype, seed=0, two_four=False, n_m=(2, 4)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if two_four:
        n, m = n_m
        keep = torch.rand(out_f, in_f // m, m, generator=g).topk(n, dim=-1).indices
        mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, keep, True)
        w = w * mask.reshape(out_f, in_f)
    else:
        w = w * (torch.rand(out_f, in_f, generator=g) < density)
    w[3] = 0  # an empty row
    w[:, 8:16] = 0  # an empty mask byte in every row
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density, two_four", [(0.5, False), (0.1, False), (None, True)])
@pytest.mark.parametrize("rows", [1, 11])  # 11: more than one call of the kernel
@pytest.mark.parametrize("width", [576, 600])  # 600: a 24-column tail past the 64-column words
@pytest.mark.parametrize("isa", ISAS)
def test_matches_torch(dtype, density, two_four, rows, width, isa):
    w = _weight(96, width, density, dtype, two_four=two_four)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(5))
    got = bitmask_linear(x, BitmaskWeight.from_dense(w), isa)
    want = x @ w.float().T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# int8 values: (pattern, the layout from_dense picks). The avx512/amx builds' VBMI kernels (any
# mask, 2:4) round activations to int16 per 64 columns: their error bound is wider
_INT8_CASES = [("50%", "any"), ("4:8", "4of8"), ("2:4", "2of4")]


def _int8_weight(pattern, width, seed=0):
    if pattern == "50%":
        w = _weight(96, width, 0.5, torch.float32, seed)
    else:
        w = _weight(96, width, None, torch.float32, seed, two_four=True,
                    n_m=(2, 4) if pattern == "2:4" else (4, 8))
    # small kept weights that int8 rounds to zero: from_dense stores zeros in their place to
    # keep the fixed layout
    w[5, 16:24] *= 1e-3
    q, s = quantize_int8(w)
    s[3] = 1.0  # the empty row
    return q, s


@pytest.mark.parametrize("pattern, layout", _INT8_CASES)
@pytest.mark.parametrize("rows", [1, 3, 11])
@pytest.mark.parametrize("width", [40, 576, 600])  # past the 64-column steps: 40 and 24 columns
@pytest.mark.parametrize("isa", ISAS)
def test_int8_values_match_torch(pattern, layout, rows, width, isa):
    q, s = _int8_weight(pattern, width)
    w = BitmaskWeight.from_dense(q, s)
    # (40 columns: the empty row and byte are too large a share to fill, so any mask)
    assert w.layout == (layout if width > 64 else "any")
    assert ((q != 0) & ~_kept(w)).sum() == 0  # every nonzero weight is kept
    rtol = 2e-4 if isa != "avx2" and w.layout != "4of8" else 1e-5
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(5))
    want = x @ dequantize_int8(q, s).T
    got = bitmask_linear(x, w, isa)
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))


def _kept(w: BitmaskWeight) -> torch.Tensor:
    bits = torch.arange(8, dtype=torch.uint8)
    return ((w.mask[..., None] >> bits) & 1).bool().reshape(w.shape)


def test_int8_fixed_layouts_fill_groups_with_stored_zeros():
    q, s = _int8_weight("2:4", 576)
    w = BitmaskWeight.from_dense(q, s)
    kept = _kept(w).reshape(96, -1, 4)
    assert (kept.sum(-1) == 2).all()  # exactly 2 of every 4, the empty row included
    assert w.values.numel() - 64 == 96 * 576 // 2  # 64: the padding
    assert (w.values == 0).sum() > 64  # the rounded-to-zero and empty-row weights, stored
    # too sparse for a fixed layout: filling would add more than an eighth
    sparse_q = q * (torch.rand(q.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    assert BitmaskWeight.from_dense(sparse_q.to(torch.int8), s).layout == "any"


@pytest.mark.parametrize("isa", ISAS)
def test_each_build_has_its_expand_width(isa):
    # the avx512/amx builds take the VBMI2 path (32 bf16 columns per expand), avx2 the table;
    # int8 weights take VBMI byte permutes of 64 columns there, 8-column shuffles on avx2
    assert bf16_columns_per_expand(isa) == (8 if isa == "avx2" else 32)
    assert int8_columns_per_step(isa) == (8 if isa == "avx2" else 64)


def test_int8_values_need_their_scales():
    q, s = _int8_weight("2:4", 64)
    with pytest.raises(ValueError, match="scales"):
        BitmaskWeight.from_dense(q)
    with pytest.raises(ValueError, match="scales"):
        BitmaskWeight.from_dense(q.float(), s)
    with pytest.raises(ValueError, match="one scale per row"):
        BitmaskWeight.from_dense(q, s[:5])


def test_half_sparse_bf16_reads_about_9_bits_per_weight():
    w = _weight(256, 1536, 0.5, torch.bfloat16)
    bits = BitmaskWeight.from_dense(w).nbytes() * 8 / w.numel()
    assert 8.5 < bits < 9.5


def test_two_four_int8_reads_about_5_bits_per_weight():
    q, s = _int8_weight("2:4", 1536)
    bits = BitmaskWeight.from_dense(q, s).nbytes() * 8 / q.numel()
    assert 5.0 <= bits < 5.5


def test_refuses_widths_the_mask_cannot_cover():
    with pytest.raises(ValueError, match="multiple of 8"):
        BitmaskWeight.from_dense(torch.ones(4, 12))
