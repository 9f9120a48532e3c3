"""The low-bit kernels of csrc/lowbit.c (built and loaded by turbollm.native_build; the avx512
and amx builds take csrc/lowbit_avx512.h's AVX-512 VNNI dot products, bit-identical to avx2's)."""
from __future__ import annotations

import functools
from pathlib import Path

from turbollm.native_build import I64 as _I
from turbollm.native_build import PTR as _P
from turbollm.native_build import load_library

_SRC = Path(__file__).parent / "csrc" / "lowbit.c"
_SIGNATURES = {
    "q4_gemm": [_P, _I, _P, _P, _P, _I, _P, _I, _I, _I],
    "q8_gemm": [_P, _I, _P, _P, _P, _I, _I, _I],
    "q4_dequant": [_P, _P, _P, _I, _P, _I, _I, _I, _I],
    "q8_dequant": [_P, _P, _P, _I, _I, _I, _I],
    "q4_gemm_a16": [_P, _I, _P, _P, _P, _I, _P, _I, _I, _I],
    "q8_gemm_a16": [_P, _I, _P, _P, _P, _I, _I, _I],
}


_LANES_SIGNATURES = {
    "q4_gemm_lanes": _SIGNATURES["q4_gemm_a16"],
    "q8_gemm_lanes": _SIGNATURES["q8_gemm_a16"],
}

_AMX_SIGNATURES = {
    "q4_gemm_amx": _SIGNATURES["q4_gemm"],
    "q8_gemm_amx": _SIGNATURES["q8_gemm"],
}


@functools.cache
def lib():
    """The loaded kernel library, or None where it cannot run here (then torch kernels serve)."""
    return load_library(_SRC, _SIGNATURES)


@functools.cache
def lanes():
    """The library when it is an AVX-512 build (avx512, amx), which has the outputs-in-lanes
    kernels for several rows (csrc/lowbit_lanes.h: q4_gemm_lanes, q8_gemm_lanes), else None."""
    L = lib()
    if L is None or not hasattr(L, "q4_gemm_lanes"):
        return None
    for name, args in _LANES_SIGNATURES.items():
        fn = getattr(L, name)
        fn.argtypes, fn.restype = args, None
    return L


@functools.cache
def amx():
    """The library when it is the amx build and the kernel may use AMX tiles (csrc/lowbit_amx.h:
    q4_gemm_amx, q8_gemm_amx), else None."""
    L = lib()
    if L is None or not hasattr(L, "lowbit_amx_ready"):
        return None
    L.lowbit_amx_ready.argtypes, L.lowbit_amx_ready.restype = [], _I
    if not L.lowbit_amx_ready():
        return None
    for name, args in _AMX_SIGNATURES.items():
        fn = getattr(L, name)
        fn.argtypes, fn.restype = args, None
    return L
