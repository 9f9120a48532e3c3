"""What the machine can compute fast (decides `dtype=auto` on CPU), and its free memory."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AMX or AVX-512 BF16).

    Without them torch runs bf16 matmuls on a slow fallback (measured ~6 GFLOP/s on an AVX2
    EPYC, 10x slower than fp32), so fp32 is the fast choice there.
    """
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def available_memory_bytes() -> int | None:
    """Memory the kernel can hand out without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
