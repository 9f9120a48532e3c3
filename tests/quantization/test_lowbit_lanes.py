"""The outputs-in-lanes kernels (q4_gemm_lanes, q8_gemm_lanes; csrc/lowbit_lanes.h) of the
AVX-512 builds: right against an fp64 reference on the int16-rounded activations, for every
shape kind the row kernels are tested with (out not a multiple of the 16-row panels, odd
block counts, groups of 1-4 blocks and a shorter last group, int8 per channel), and chosen by
kernels.py for the row counts they serve where multi-row products may leave the row kernels'
bits, never where rows must keep them (row_invariant, or the multi-row switch off).
"""
import ctypes

import pytest
import torch

from test_lowbit_isa import (INT4_SHAPES, INT8_SHAPES, _assert_near, _int4_reference,
                             _int4_state, _int8_reference, _lib, _q4, _q8)
from turbollm import native_build
from turbollm.layers import prefill_gemm
from turbollm.quantization import kernels, native

LANE_ISAS = [isa for isa in native_build.ISA_VARIANTS if isa != "avx2"]
ROWS = [1, 4, 9, 16, 17, 33, 64, 100]
LANES4, LANES8 = "q4_gemm_lanes", "q8_gemm_lanes"  # called as test_lowbit_isa's _q4 / _q8


def _lanes_lib(isa: str):
    lib = _lib(isa)  # skips, with the missing flags named, where this CPU cannot run it
    for name, args in native._LANES_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


@pytest.mark.parametrize("isa", LANE_ISAS)
def test_every_avx512_build_has_the_lanes_kernels_and_avx2_has_none(isa):
    """Compiled here whatever this CPU runs (a build error fails, never skips); loading a
    library does not execute its AVX-512 code."""
    lib = ctypes.CDLL(str(native_build.build_library(native._SRC, isa)))
    assert hasattr(lib, "q4_gemm_lanes") and hasattr(lib, "q8_gemm_lanes")
    avx2 = ctypes.CDLL(str(native_build.build_library(native._SRC, "avx2")))
    assert not hasattr(avx2, "q4_gemm_lanes")


@pytest.mark.parametrize("isa", LANE_ISAS)
@pytest.mark.parametrize("zero_form", [True, False])
@pytest.mark.parametrize("n,k,g", INT4_SHAPES + [(1536, 576, 32), (576, 1536, 32)])
def test_q4_gemm_lanes_matches_the_reference(isa, n, k, g, zero_form):
    lib = _lanes_lib(isa)
    st = _int4_state(n, k, g, zero_form, seed=n + k + g)
    for m in ROWS:
        x = torch.randn(m, k) * 2
        _assert_near(_q4(lib, st, x, LANES4), _int4_reference(st, x))


@pytest.mark.parametrize("isa", LANE_ISAS)
@pytest.mark.parametrize("n,k,g", INT8_SHAPES)
def test_q8_gemm_lanes_matches_the_reference(isa, n, k, g):
    lib = _lanes_lib(isa)
    torch.manual_seed(n + k + g)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # the whole range, -128 included
    st = kernels.int8_pack(q, torch.rand(n, k // g) * 0.01 + 1e-4, g)
    for m in ROWS:
        x = torch.randn(m, k)
        _assert_near(_q8(lib, st, x, LANES8), _int8_reference(st, x))


def test_a_row_gets_the_same_bits_whatever_else_is_in_the_call():
    """One order per output whatever M and the row's place in the tiles of 8"""
    lib = native.lanes()
    if lib is None:
        pytest.skip("the kernel library here is not an AVX-512 build (this CPU lacks "
                    "AVX-512 BW/VNNI/BF16/VBMI2)")
    st = _int4_state(70, 576, 32, False, seed=3)
    x = torch.randn(33, 576)
    whole = _q4(lib, st, x, LANES4)
    assert torch.equal(_q4(lib, st, x[20:21].repeat(17, 1), LANES4)[5], whole[20])


def test_the_row_counts_they_serve_take_them_and_row_invariant_steps_do_not(multi_row_bf16):
    if native.lanes() is None:
        pytest.skip("the kernel library here is not an AVX-512 build (this CPU lacks "
                    "AVX-512 BW/VNNI/BF16/VBMI2)")
    st = _int4_state(64, 576, 32, False, seed=4)
    addr = native_build.function_address
    lo, hi = kernels.LANES_MIN_ROWS, kernels.LANES_MAX_ROWS
    if native.amx() is not None:  # AMX tiles and oneDNN's AMX GEMM serve these rows instead
        for M in (lo, 33, hi):
            picked = kernels.int4_row_kernel(st, M, 576)
            assert picked is None or picked.spec[0] != addr(native.lib().q4_gemm_lanes)
        pytest.skip("this CPU has AMX: the lanes kernels are not chosen (checked above)")
    for M in (lo, 33, hi):
        assert kernels.int4_row_kernel(st, M, 576).spec[0] == addr(native.lib().q4_gemm_lanes)
        x = torch.randn(M, 576)  # the call int4_linear makes is the lanes kernel's
        assert torch.equal(kernels.int4_linear(x, st), _q4(native.lib(), st, x, LANES4))
        assert kernels.rounds_activations(x, 32)
    assert kernels.int4_row_kernel(st, hi + 1, 576) is None  # widened: oneDNN's bf16 GEMM
    assert kernels.int4_row_kernel(st, lo - 1, 576).spec[0] != addr(native.lib().q4_gemm_lanes)
    q8 = kernels.int8_pack(torch.randint(-128, 128, (64, 576), dtype=torch.int8),
                           torch.rand(64, 18) * 0.01, 32)
    assert kernels.int8_row_kernel(q8, 33, 576).spec[0] == addr(native.lib().q8_gemm_lanes)
    with prefill_gemm.row_invariant():
        for M in (lo, 33):
            assert kernels.int4_row_kernel(st, M, 576).spec[0] == addr(native.lib().q4_gemm_a16)
    prefill_gemm.use_bf16(False)  # dtype=bfloat16, prefill_dtype=float32: the row kernels' bits
    assert kernels.int4_row_kernel(st, 33, 576).spec[0] == addr(native.lib().q4_gemm_a16)
