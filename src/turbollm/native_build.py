"""Build (once, cached) and load the project's small C kernels (AVX2 + FMA + F16C).

Each library is one plain C file (plus the shared headers of csrc/) compiled by the system's gcc
(about a second, no torch headers) and called through ctypes on tensors' data pointers. It is
built on first use into ~/.cache/turbollm/kernels/ (or $XDG_CACHE_HOME), keyed by the hash of
the source and headers. When the CPU lacks AVX2/FMA/F16C or no compiler works, `load_library`
returns None and callers use torch instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PTR, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# Headers every kernel may include (simd.h, decode_abi.h): on the include path, and part of
# each build's key.
_INCLUDE = Path(__file__).parent / "csrc"


@functools.cache
def cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags and "f16c" in flags


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "turbollm" / "kernels"


def _build(src: Path, out: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name, then rename: concurrent processes never load a partial file
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = tmp.name
    cmd = [cc, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC",
           f"-I{_INCLUDE}", str(src), "-o", tmp_path, "-lm"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp_path, out)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


@functools.cache
def _load(src: Path) -> ctypes.CDLL | None:
    if not cpu_has_avx2_fma():
        return None
    try:
        h = hashlib.sha256(src.read_bytes())
        for header in sorted(_INCLUDE.glob("*.h")):
            h.update(header.read_bytes())
        digest = h.hexdigest()[:16]
        path = _cache_dir() / f"{src.stem}-{digest}.so"
        if not path.exists():
            _build(src, path)
        # torch has already loaded its libgomp, so the library's OpenMP shares torch's threads
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("C kernels of %s unavailable (%s); using torch's kernels", src.name, e)
        return None


def load_library(src: Path, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The compiled `src` with its functions' argument types set (all return void), or None."""
    handle = _load(src)
    if handle is None:
        return None
    for name, args in signatures.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = args, None
    return handle


def function_address(fn) -> int:
    """The address of a loaded C function, for C code that calls it through a pointer."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class RowKernel:
    """A projection's C call for a fixed row count, as fn(x_ptr, y_ptr), and the same call as
    data: `spec` = (function address, call kind, bound integer arguments), for callers that
    make it from C (models/native_decode.py). A kind is the name of a LIN_* call kind of
    csrc/decode_abi.h: its code is read from the library (layers/native_ops.decode_abi)."""

    # names, not codes: the codes live in decode_abi.h only
    LOWBIT, Q8, DENSE = "LIN_LOWBIT", "LIN_Q8", "LIN_DENSE"
    __slots__ = ("call", "spec")

    def __init__(self, call, fn, kind: str, *args: int):
        self.call = call
        self.spec = (function_address(fn), kind, *args)

    def __call__(self, x: int, y: int) -> None:
        self.call(x, y)
