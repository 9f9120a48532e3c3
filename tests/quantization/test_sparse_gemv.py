"""The bitmask sparse GEMV (quantization/csrc/sparse.c) against torch on random sparse weights:
fp32 and bf16 values, unstructured and 2:4 masks, empty rows and bytes, several row counts."""
from __future__ import annotations

import pytest
import torch

from turbollm.native_build import supported_isas
from turbollm.quantization.sparse import (BitmaskWeight, bf16_columns_per_expand, bitmask_linear,
                                          lib)

pytestmark = pytest.mark.skipif(lib() is None, reason="no C kernels on this machine")
# avx2 expands 8 columns with a permutation table, avx512/amx 16 with AVX-512 expands (the
# K % 64 tail on the 8-column path): test each build this CPU runs
ISAS = supported_isas()


def _weight(out_f, in_f, density, dtype, seed=0, two_four=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if two_four:
        keep = torch.rand(out_f, in_f // 4, 4, generator=g).topk(2, dim=-1).indices
        mask = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
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


@pytest.mark.parametrize("isa", ISAS)
def test_each_build_has_its_expand_width(isa):
    # the avx512/amx builds take the VBMI2 path (32 bf16 columns per expand), avx2 the table
    assert bf16_columns_per_expand(isa) == (8 if isa == "avx2" else 32)


def test_half_sparse_bf16_reads_about_9_bits_per_weight():
    w = _weight(256, 1536, 0.5, torch.bfloat16)
    bits = BitmaskWeight.from_dense(w).nbytes() * 8 / w.numel()
    assert 8.5 < bits < 9.5


def test_refuses_widths_the_mask_cannot_cover():
    with pytest.raises(ValueError, match="multiple of 8"):
        BitmaskWeight.from_dense(torch.ones(4, 12))
