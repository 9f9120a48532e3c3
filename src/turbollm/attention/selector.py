"""Which attention backend a model runs: looked up by name, above the backends it names (so
backend.py, the interface, imports none of them)."""
from __future__ import annotations

from turbollm.attention.backend import AttentionBackend


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    """Look up a backend by name."""
    if name in ("torch", "torch_sdpa", "reference"):
        from turbollm.attention.torch_sdpa import TorchAttentionBackend
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")
