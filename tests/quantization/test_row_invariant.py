"""Row-invariant products (layers/prefill_gemm.row_invariant): each row's bits do not depend on
how many rows share the call, for every weight kind the C decode path serves. Speculative
verification and batch-invariant steps (KernelConfig.batch_invariant) rely on it."""
from __future__ import annotations

import pytest
import torch

from turbollm import native_build
from turbollm.layers import native_ops, prefill_gemm
from turbollm.quantization import kernels, native
from turbollm.quantization.int4 import quantize_int4_rtn

pytestmark = pytest.mark.skipif(native.lib() is None, reason="no C kernels (needs AVX2 and gcc)")

# 1: a decode row; 9: a verification; 100, 300: prompt chunks past every few-row limit (tiles
# up to 128 rows, packed kernels up to 64, dense C up to 128)
ROWS = (1, 2, 9, 100, 300)


def _rows_alone_equal(linear, K: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(max(ROWS), K)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(max(ROWS))])
    for M in ROWS:
        assert torch.equal(linear(x[:M]), alone[:M]), M


@pytest.mark.parametrize("group", [32, 128])
def test_int4_rows_equal_alone(group):
    q, s, z = quantize_int4_rtn(torch.randn(96, 576), group)
    state = kernels.int4_pack(q, s, z, group)
    with prefill_gemm.row_invariant():
        _rows_alone_equal(lambda x: kernels.int4_linear(x, state), 576)
        # the path: int16 activation rows at every row count, never tiles or widening
        for M in ROWS:
            kernel = kernels.int4_row_kernel(state, M, 576)
            assert kernel.spec[0] == native_build.function_address(native.lib().q4_gemm_a16)


def test_int8_rows_equal_alone():
    torch.manual_seed(0)
    w = torch.randn(80, 576)
    scales = w.abs().amax(dim=1, keepdim=True) / 127
    state = kernels.int8_pack(torch.round(w / scales).to(torch.int8), scales.squeeze(1))
    with prefill_gemm.row_invariant():
        _rows_alone_equal(lambda x: kernels.int8_linear(x, state), 576)
        for M in ROWS:
            kernel = kernels.int8_row_kernel(state, M, 576)
            assert kernel.spec[0] == native_build.function_address(native.lib().q8_gemm_a16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_rows_equal_alone(dtype):
    w = torch.randn(72, 576).to(dtype)
    with prefill_gemm.row_invariant():
        assert native_ops.dense_row_kernel(w, max(ROWS)) is not None  # C at any row count
        _rows_alone_equal(lambda x: native_ops.dense_linear(x, w), 576)
    assert native_ops.dense_row_kernel(w, native_ops.MAX_DENSE_ROWS + 1) is None  # else torch


def test_outside_it_many_rows_leave_the_row_kernels():
    """The switch is what keeps prompt-sized products on the row kernels (else they widen the
    weight or take tiles: faster, with other bits)."""
    q, s, z = quantize_int4_rtn(torch.randn(64, 576), 32)
    state = kernels.int4_pack(q, s, z, 32)
    kernel = kernels.int4_row_kernel(state, 300, 576)
    assert kernel is None or kernel.spec[0] != native_build.function_address(
        native.lib().q4_gemm_a16)
