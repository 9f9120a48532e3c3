"""The int16-activation low-bit kernels (q4_gemm_a16, q8_gemm_a16) give the same bits in every
ISA build: the avx512 and amx builds take AVX-512 BW + VNNI dot products (lowbit_avx512.h), the
avx2 build the AVX2 ones, and a model's greedy answers must not depend on the CPU it runs on.

Each supported variant's library is loaded next to the avx2 one and called as kernels.py's
int4_row_kernel / int8_row_kernel call it. The shapes reach every path: one row (gemv_blocks,
gemv_groups), two rows (int4: gemv_blocks_pair / gemv_groups_pair, int8: the tiled path), more
rows (tile_dots*, tiles of 1-8 rows); an odd block count per row or group (the AVX-512 code
pairs blocks, a lone last block goes the AVX2 way), groups of an odd block count (G = 96),
a shorter last group (576 = 4 * 128 + 64), out not a multiple of the 4-row blocks.
"""
import ctypes
import shutil

import pytest
import torch

from turbollm import native_build
from turbollm.quantization import kernels, native
from turbollm.quantization.int4 import quantize_int4_rtn
from turbollm.quantization.int8 import quantize_int8

ROWS = [1, 2, 3, 5, 9, 16, 33, 48]
# (out, in, G): 18 blocks of 32 in groups of 1, 2, 3 (odd), 4 blocks (+ a last group of 2);
# 3 and 5 blocks per row (odd: a lone last block) in one or several groups
INT4_SHAPES = [(37, 576, 32), (37, 576, 64), (37, 576, 96), (37, 576, 128), (70, 96, 32),
               (70, 160, 64), (70, 160, 96)]
INT8_SHAPES = [(37, 576, 576), (37, 576, 32), (70, 96, 96), (70, 160, 32), (70, 160, 160)]
OTHER_ISAS = [isa for isa in native_build.ISA_VARIANTS if isa != "avx2"]


def _missing(isa: str) -> set:
    return set(native_build.ISA_VARIANTS[isa][0] - native_build.cpu_flags())


def _lib(isa: str):
    if isa not in native_build.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} build: it lacks "
                    f"{', '.join(sorted(_missing(isa)))}")
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    native_build.build_library(native._SRC, isa)  # a build error fails here, never skips
    lib = native_build.load_library(native._SRC, native._SIGNATURES, isa=isa)
    assert lib is not None, f"the {isa} build of lowbit.c did not load"
    return lib


@pytest.fixture(scope="module")
def avx2():
    return _lib("avx2")


def _int4_state(n, k, g, zero_form, seed):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    if zero_form:
        return kernels.int4_pack(*quantize_int4_rtn(w, g), g)
    q, s, z = quantize_int4_rtn(w, g)  # GGUF Q4_1's form: w = q * s + min
    return kernels.int4_pack_minform(q, s, (-z * s).half().float(), g)


def _q4(lib, st: kernels.Int4State, x: torch.Tensor, fn: str = "q4_gemm_a16") -> torch.Tensor:
    """lib.<fn> (q4_gemm_a16, or a kernel with its arguments) as int4_row_kernel calls it"""
    (M, k), n = x.shape, st.packed.shape[0]
    y = torch.full((M, n), float("nan"))
    getattr(lib, fn)(x.data_ptr(), M, st.packed.data_ptr(), st.scales.data_ptr(),
                     st.offsets.data_ptr(), int(st.zero_form), y.data_ptr(), n, k, st.group_size)
    return y


def _q8(lib, st: kernels.Int8State, x: torch.Tensor, fn: str = "q8_gemm_a16") -> torch.Tensor:
    """lib.<fn> (q8_gemm_a16, or a kernel with its arguments) as int8_row_kernel calls it"""
    (M, k), n = x.shape, st.qweight.shape[0]
    y = torch.full((M, n), float("nan"))
    getattr(lib, fn)(x.data_ptr(), M, st.qweight.data_ptr(), st.scales.data_ptr(),
                     y.data_ptr(), n, k, st.group_size)
    return y


def _int4_reference(st: kernels.Int4State, x: torch.Tensor) -> torch.Tensor:
    """fp64 dequantize-then-matmul on the int16-rounded activations the kernel sees"""
    s, mn = st.scale_min()
    k = x.shape[1]
    cols = torch.arange(k) // st.group_size
    w = kernels.int4_unpack_q(st).double() * s.double()[:, cols] + mn.double()[:, cols]
    return kernels.int16_activations(x).double() @ w.t()


def _int8_reference(st: kernels.Int8State, x: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    cols = torch.arange(k) // st.group_size
    w = st.qweight.double() * st.scales.double()[:, cols]
    return kernels.int16_activations(x).double() @ w.t()


def _assert_near(y: torch.Tensor, ref: torch.Tensor):
    # fp32 sums of K products of O(1) terms: relative ~K * 2^-24 of the terms' scale, far
    # below 1e-4; a wrong lane order, scale or block would be off by O(1) of the output
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize("zero_form", [True, False])
@pytest.mark.parametrize("n,k,g", INT4_SHAPES)
def test_q4_gemm_a16_is_bit_identical_to_avx2(avx2, isa, n, k, g, zero_form):
    lib = _lib(isa)
    st = _int4_state(n, k, g, zero_form, seed=n + k + g)
    for m in ROWS:
        x = torch.randn(m, k) * 2
        y, ref = _q4(lib, st, x), _q4(avx2, st, x)
        assert torch.equal(y, ref), (m, (y - ref).abs().max())
        _assert_near(y, _int4_reference(st, x))


@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize("n,k,g", INT8_SHAPES)
def test_q8_gemm_a16_is_bit_identical_to_avx2(avx2, isa, n, k, g):
    lib = _lib(isa)
    torch.manual_seed(n + k + g)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # the whole range, -128 included
    st = kernels.int8_pack(q, torch.rand(n, k // g) * 0.01 + 1e-4, g)
    for m in ROWS:
        x = torch.randn(m, k)
        y, ref = _q8(lib, st, x), _q8(avx2, st, x)
        assert torch.equal(y, ref), (m, (y - ref).abs().max())
        _assert_near(y, _int8_reference(st, x))


@pytest.mark.parametrize("isa", OTHER_ISAS)
def test_rounded_quantized_weights_int8_per_channel(avx2, isa):
    """int8 per channel from quantize_int8 (the engine's own int8), 576 wide"""
    lib = _lib(isa)
    torch.manual_seed(5)
    st = kernels.int8_pack(*quantize_int8(torch.randn(37, 576) * 0.05))
    for m in ROWS:
        x = torch.randn(m, 576)
        assert torch.equal(_q8(lib, st, x), _q8(avx2, st, x))


def test_the_comparison_sees_a_one_ulp_difference_and_a_wrong_kernel(avx2):
    """torch.equal on these outputs catches the smallest change, and the reference check a
    kernel that is wrong in a plausible way (blocks of a pair swapped, or a block off_by_one)"""
    st = _int4_state(37, 576, 32, True, seed=1)
    x = torch.randn(9, 576)
    y = _q4(avx2, st, x)
    bumped = y.clone()
    bumped[4, 7] = torch.nextafter(bumped[4, 7], torch.tensor(float("inf")))
    assert not torch.equal(bumped, y)
    ref = _int4_reference(st, x)
    _assert_near(y, ref)
    # the weights with blocks 0 and 1 swapped (what a mixed-up pair order would compute)
    swapped = kernels.Int4State(st.packed.clone(), st.scales, st.offsets, 32, True)
    swapped.packed[:, :16], swapped.packed[:, 16:32] = st.packed[:, 16:32], st.packed[:, :16]
    with pytest.raises(AssertionError):
        _assert_near(_q4(avx2, swapped, x), ref)
    off_by_one = kernels.Int4State(st.packed.clone(), st.scales, st.offsets, 32, True)
    off_by_one.packed[:, -16:] = st.packed[:, -16:] ^ 0x11  # the last block's nibbles off by one
    with pytest.raises(AssertionError):
        _assert_near(_q4(avx2, off_by_one, x), ref)


def test_unsupported_variants_name_the_missing_flags(monkeypatch):
    monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert native_build.supported_isas() == ["avx2"]
    assert "avx512_vnni" in _missing("avx512")
    with pytest.raises(pytest.skip.Exception, match="avx512_vnni"):
        _lib("avx512")


def test_a_header_next_to_the_source_is_part_of_the_build_key(tmp_path):
    """lowbit.c includes lowbit_avx512.h from its own folder: editing it must rebuild"""
    src = tmp_path / "k.c"
    src.write_text('#include "k.h"\n')
    (tmp_path / "k.h").write_text("// one\n")
    before = native_build.library_path(src, "avx2")
    (tmp_path / "k.h").write_text("// two\n")
    assert native_build.library_path(src, "avx2") != before
