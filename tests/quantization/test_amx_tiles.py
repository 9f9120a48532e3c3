"""The AMX tile kernels for several activation rows (csrc/lowbit_amx.h: q4_gemm_amx,
q8_gemm_amx) against torch's fp32 product with the dequantized weight (they round nothing: exact
codes, scales applied in fp32, activations split into two bf16 parts), and the row counts
kernels.py routes to them.

The amx build always compiles (test_native_build builds every variant); running the tiles needs
a CPU with AMX, else those tests skip and say so.
"""
import subprocess

import pytest
import torch

from turbollm import native_build
from turbollm.layers import prefill_gemm
from turbollm.quantization import kernels, native
from turbollm.quantization.int4 import quantize_int4_rtn

# rows: one, under a tile, a tile and one more, two passes of two tiles and a half
ROWS = [1, 7, 17, 33, 64, 80]
INT4_SHAPES = [(96, 576, 32), (37, 576, 128), (70, 160, 64)]  # 37, 70: a partial row block
INT8_SHAPES = [(96, 576, 576), (37, 576, 32), (70, 160, 32)]


def test_the_amx_build_exports_the_tile_kernels():
    path = native_build.build_library(native._SRC, "amx")  # a build error fails here
    symbols = subprocess.run(["nm", "-D", str(path)], capture_output=True, text=True).stdout
    for name in ("q4_gemm_amx", "q8_gemm_amx", "lowbit_amx_ready"):
        assert f" T {name}" in symbols, name


@pytest.fixture
def amx():
    L = native.amx()
    if L is None:
        pytest.skip("no AMX tiles here: the CPU lacks amx_tile/amx_bf16, or the process runs "
                    f"the {native_build._selected} build")
    return L


def _int8_state(n: int, k: int, g: int) -> kernels.Int8State:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return kernels.int8_pack(q, torch.rand(n, k // g) * 0.01 + 1e-3, g)


def _close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y equals x w^T up to fp32 summation order and the activations' 16 mantissa bits (bf16
    products would be off by ~1e-3 here)."""
    ref = x.double() @ w.double().T
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 3e-5, err.item()


@pytest.mark.parametrize("n,k,g", INT4_SHAPES)
@pytest.mark.parametrize("zero_form", [True, False])
def test_q4_tiles_equal_the_bf16_product(amx, n, k, g, zero_form):
    torch.manual_seed(n + k + g)
    w = torch.randn(n, k)
    q, s, z = quantize_int4_rtn(w, g)
    state = (kernels.int4_pack(q, s, z, g) if zero_form
             else kernels.int4_pack_minform(q, s, -z * s, g))
    dense = kernels.int4_dequant_rows(state, 0, n)
    for M in ROWS:
        x = torch.randn(M, k)
        y = torch.full((M, n), float("nan"))
        amx.q4_gemm_amx(x.data_ptr(), M, state.packed.data_ptr(), state.scales.data_ptr(),
                        state.offsets.data_ptr(), int(state.zero_form), y.data_ptr(), n, k, g)
        _close(y, x, dense)


@pytest.mark.parametrize("n,k,g", INT8_SHAPES)
def test_q8_tiles_equal_the_bf16_product(amx, n, k, g):
    torch.manual_seed(n + k + g)
    state = _int8_state(n, k, g)
    dense = kernels.int8_dequant_rows(state, 0, n)
    for M in ROWS:
        x = torch.randn(M, k)
        y = torch.full((M, n), float("nan"))
        amx.q8_gemm_amx(x.data_ptr(), M, state.qweight.data_ptr(), state.scales.data_ptr(),
                        y.data_ptr(), n, k, g)
        _close(y, x, dense)


def test_rows_of_a_bf16_product_would_fail_the_check(amx):
    torch.manual_seed(1)
    x, w = torch.randn(16, 576), torch.randn(64, 576)
    with pytest.raises(AssertionError):
        _close(x.bfloat16().float() @ w.bfloat16().float().T, x, w)


def test_linears_route_tile_row_counts_to_the_tiles(amx, multi_row_bf16):
    torch.manual_seed(0)
    q, s, z = quantize_int4_rtn(torch.randn(64, 576), 32)
    state = kernels.int4_pack(q, s, z, 32)
    for M, tiles in ((1, False), (kernels.AMX_MIN_ROWS - 1, False), (kernels.AMX_MIN_ROWS, True),
                     (kernels.AMX_MAX_ROWS, True), (kernels.AMX_MAX_ROWS + 1, False)):
        kernel = kernels.int4_row_kernel(state, M, 576)
        uses_tiles = kernel is not None and kernel.spec[0] == native_build.function_address(
            amx.q4_gemm_amx)
        assert uses_tiles == tiles, M
    with prefill_gemm.row_invariant():  # e.g. a speculative verification: one-row kernels
        kernel = kernels.int4_row_kernel(state, 9, 576)
        assert kernel.spec[0] == native_build.function_address(amx.q4_gemm_a16)
    x = torch.randn(16, 576)
    _close(kernels.int4_linear(x, state), x, kernels.int4_dequant_rows(state, 0, 64))


def test_without_bf16_multi_row_products_no_row_count_takes_tiles(amx):
    old = prefill_gemm.in_bf16()
    prefill_gemm.use_bf16(False)
    try:
        state = _int8_state(64, 576, 32)
        tile_fn = native_build.function_address(amx.q8_gemm_amx)
        for M in (1, 8, 16, 64):
            assert kernels.int8_row_kernel(state, M, 576).spec[0] != tile_fn
    finally:
        prefill_gemm.use_bf16(old)
