"""What runs on this machine: CPU, the flags that matter, the C kernel variant, the dtype that
`dtype=auto` gives, threads — one line at start-up (as llama.cpp's system_info), `turbollm
info`, and the labels of /metrics' build-info gauge."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from turbollm.config import default_num_threads
from turbollm.native_build import selected_isa, supported_isas
from turbollm.platform_info import cpu_flags

# The /proc/cpuinfo flags our kernels and dtype choice look at.
FLAGS_THAT_MATTER = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512vbmi", "avx512_vbmi2", "amx_tile", "amx_int8",
                     "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name (platform.processor() where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info(device: str = "cpu", isa: str | None = None, num_threads: int | None = None,
                storage_dtype: torch.dtype | None = None,
                compute_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Facts about what runs here, as strings (the engine passes what it chose)."""
    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        "flags": " ".join(f for f in FLAGS_THAT_MATTER if f in flags) or "none",
        "isa_supported": " ".join(supported_isas()) or "none",
        "isa": isa or selected_isa() or "none (torch kernels)",
        "threads": str(num_threads or torch.get_num_threads() or default_num_threads()),
        "device": device,
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if storage_dtype is not None:
        info["dtype"] = str(storage_dtype).removeprefix("torch.")
    if compute_dtype is not None:
        info["compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    return info


def format_line(info: dict[str, str]) -> str:
    """One line: key=value pairs, the CPU model quoted."""
    return " | ".join(f"{k} {v!r}" if k == "cpu" else f"{k} {v}" for k, v in info.items())
