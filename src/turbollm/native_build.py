"""Build (once, cached) and load the project's small C kernels, one build per x86 ISA variant.

Each library is one plain C file (plus the shared headers of csrc/) compiled by the system's gcc
(about a second, no torch headers) and called through ctypes on tensors' data pointers. It is
built on first use into ~/.cache/turbollm/kernels/ (or $XDG_CACHE_HOME), keyed by the hash of
the source and headers and by the ISA variant.

Variants (llama.cpp's CPU backend variants are the model): `avx2` (AVX2 + FMA + F16C), `avx512`
(+ AVX-512 F/BW/VL/VNNI/BF16: Zen 4/5, Sapphire Rapids and later) and `amx` (+ AMX tile, int8
and bf16: Sapphire Rapids and later). The same sources build for each; code for the wider
instructions sits under `#ifdef __AVX512VNNI__` etc. The variant is chosen once per process
(`select_isa`, from KernelConfig.cpu_isa): by default the best one the CPU's flags allow. A CPU
without AVX2/FMA/F16C, or no working compiler, gives no library and callers use torch.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from turbollm.platform_info import cpu_flags

log = logging.getLogger(__name__)

PTR, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# Headers every kernel may include (simd.h, decode_abi.h): on the include path, and part of
# each build's key.
_INCLUDE = Path(__file__).parent / "csrc"

_AVX2_FLAGS = frozenset({"avx2", "fma", "f16c"})
# VBMI2 (16-bit expands: the sparse kernel) comes with BF16 on every such CPU but Cooper Lake,
# which takes the avx2 build
_AVX512_FLAGS = _AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                               "avx512vbmi", "avx512_vbmi2"}
_AMX_FLAGS = _AVX512_FLAGS | {"amx_tile", "amx_int8", "amx_bf16"}
_AVX2_CFLAGS = ["-mavx2", "-mfma", "-mf16c"]
_AVX512_CFLAGS = _AVX2_CFLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                 "-mavx512bf16", "-mavx512vbmi", "-mavx512vbmi2"]
_AMX_CFLAGS = _AVX512_CFLAGS + ["-mamx-tile", "-mamx-int8", "-mamx-bf16"]
# name -> (/proc/cpuinfo flags it needs, gcc flags); best first
ISA_VARIANTS: dict[str, tuple[frozenset, list[str]]] = {
    "amx": (_AMX_FLAGS, _AMX_CFLAGS),
    "avx512": (_AVX512_FLAGS, _AVX512_CFLAGS),
    "avx2": (_AVX2_FLAGS, _AVX2_CFLAGS),
}
ISA_CHOICES = ("auto", *ISA_VARIANTS)
_selected: str | None = None  # the process's variant, fixed by the first library loaded


def supported_isas(flags: frozenset | None = None) -> list[str]:
    """The variants this CPU runs (or a CPU with `flags`), best first."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, (need, _) in ISA_VARIANTS.items() if need <= flags]


def best_isa(flags: frozenset | None = None) -> str | None:
    """The best variant this CPU runs, or None (no AVX2/FMA/F16C)."""
    isas = supported_isas(flags)
    return isas[0] if isas else None


def select_isa(isa: str = "auto") -> str | None:
    """Fix the process's kernel variant ('auto': the best the CPU runs); returns it. A variant
    the CPU cannot run is an error; so is changing it once a library is loaded."""
    global _selected
    if isa not in ISA_CHOICES:
        raise ValueError(f"cpu_isa must be one of {ISA_CHOICES}, got {isa!r}")
    chosen = best_isa() if isa == "auto" else isa
    if chosen is not None and chosen not in supported_isas():
        raise ValueError(f"cpu_isa {isa!r}: this CPU lacks "
                         f"{', '.join(sorted(ISA_VARIANTS[isa][0] - cpu_flags()))}")
    if _selected is not None and _loaded_any() and chosen != _selected:
        raise ValueError(f"the C kernels of this process are already the {_selected!r} variant; "
                         f"cpu_isa {isa!r} needs a new process")
    _selected = chosen
    return chosen


def selected_isa() -> str | None:
    """The process's kernel variant (the best the CPU runs until select_isa says otherwise)."""
    return _selected if _selected is not None else best_isa()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "turbollm" / "kernels"


def library_path(src: Path, isa: str) -> Path:
    """Where the `isa` build of `src` lives: keyed by source, headers and variant (the shared
    headers and those next to the source, which its `#include "..."` finds first)."""
    h = hashlib.sha256(src.read_bytes())
    for header in sorted({*_INCLUDE.glob("*.h"), *src.parent.glob("*.h")}):
        h.update(header.read_bytes())
    return _cache_dir() / f"{src.stem}-{isa}-{h.hexdigest()[:16]}.so"


def build_library(src: Path, isa: str) -> Path:
    """Compile `src` for `isa` (any variant builds on any x86 machine); raises on failure."""
    out = library_path(src, isa)
    if out.exists():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name, then rename: concurrent processes never load a partial file
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = tmp.name
    cmd = [cc, "-O3", *ISA_VARIANTS[isa][1], "-fopenmp", "-shared", "-fPIC",
           f"-I{_INCLUDE}", str(src), "-o", tmp_path, "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"gcc failed on {src.name} ({isa}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp_path, out)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
    return out


_handles: dict[tuple[Path, str], ctypes.CDLL] = {}


def _loaded_any() -> bool:
    return bool(_handles)


def _load(src: Path, isa: str) -> ctypes.CDLL | None:
    key = (src, isa)
    if key not in _handles:
        try:
            # torch has already loaded its libgomp, so the library's OpenMP shares its threads
            _handles[key] = ctypes.CDLL(str(build_library(src, isa)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("C kernels of %s (%s) unavailable (%s); using torch's kernels",
                        src.name, isa, e)
            return None
    return _handles[key]


def load_library(src: Path, signatures: dict[str, list], isa: str | None = None
                 ) -> ctypes.CDLL | None:
    """The compiled `src` (the process's variant, or `isa`) with its functions' argument types
    set (all return void), or None where it cannot run here."""
    global _selected
    if isa is None:
        if _selected is None:
            _selected = best_isa()
        isa = _selected
    if isa is None or isa not in supported_isas():
        return None
    handle = _load(src, isa)
    if handle is None:
        return None
    for name, args in signatures.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = args, None
    return handle


def read_abi(handle: ctypes.CDLL, export: str):
    """The values a library exports through csrc/decode_abi.h's DEFINE_ABI_EXPORT (function
    `export`), as a read-only namedtuple of ints by name."""
    fn = getattr(handle, export)
    fn.argtypes, fn.restype = [PTR, PTR, PTR], None
    sizes = (ctypes.c_int64 * 2)()
    fn(sizes, None, None)  # how many values, how many bytes of names
    values = (ctypes.c_int64 * sizes[0])()
    names = ctypes.create_string_buffer(sizes[1])
    fn(sizes, values, names)
    return collections.namedtuple(export.title().replace("_", ""),
                                  names.value.decode().split())(*values)


def function_address(fn) -> int:
    """The address of a loaded C function, for C code that calls it through a pointer."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class RowKernel:
    """A projection's C call for a fixed row count, as fn(x_ptr, y_ptr), and the same call as
    data: `spec` = (function address, call kind, bound integer arguments), for callers that
    make it from C (models/native_decode.py). A kind is the name of a LIN_* call kind of
    csrc/decode_abi.h: its code is read from the library (layers/native_ops.decode_abi)."""

    # names, not codes: the codes live in decode_abi.h only
    LOWBIT, Q8, DENSE, SPARSE = "LIN_LOWBIT", "LIN_Q8", "LIN_DENSE", "LIN_SPARSE"
    SPARSE_Q8 = "LIN_SPARSE_Q8"
    __slots__ = ("call", "spec")

    def __init__(self, call, fn, kind: str, *args: int):
        self.call = call
        self.spec = (function_address(fn), kind, *args)

    def __call__(self, x: int, y: int) -> None:
        self.call(x, y)
