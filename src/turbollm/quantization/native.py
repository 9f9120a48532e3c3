"""Build (once, cached) and load the AVX2 low-bit kernels in csrc/lowbit.c.

The library is plain C compiled by the system's gcc (about a second, no torch headers) and
called through ctypes on tensors' data pointers. It is built on first use into
~/.cache/turbollm/kernels/ (or $XDG_CACHE_HOME), keyed by the source's hash. When the CPU lacks
AVX2/FMA/F16C or no compiler works, `lib()` returns None and callers use torch's kernels instead.
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

_SRC = Path(__file__).parent / "csrc" / "lowbit.c"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "q4_gemm": [_P, _I, _P, _P, _P, _I, _P, _I, _I, _I],
    "q8_gemm": [_P, _I, _P, _P, _P, _I, _I, _I],
    "q4_dequant": [_P, _P, _P, _I, _P, _I, _I, _I, _I],
    "q8_dequant": [_P, _P, _P, _I, _I, _I, _I],
}


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags and "f16c" in flags


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "turbollm" / "kernels"


def _build(out: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name, then rename: concurrent processes never load a partial file
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = tmp.name
    cmd = [cc, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", str(_SRC), "-o", tmp_path]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp_path, out)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


@functools.cache
def lib():
    """The loaded kernel library, or None where it cannot run here (then torch kernels serve)."""
    if not _cpu_has_avx2_fma():
        return None
    try:
        digest = hashlib.sha256(_SRC.read_bytes()).hexdigest()[:16]
        path = _cache_dir() / f"lowbit-{digest}.so"
        if not path.exists():
            _build(path)
        # torch has already loaded its libgomp, so the library's OpenMP shares torch's threads
        handle = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("low-bit C kernels unavailable (%s); using torch's kernels", e)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = args, None
    return handle
