"""The adapters a server offers by name (vLLM's --lora-modules and its load/unload routes).

A request selects an adapter by naming it as its `model`; /v1/models lists each with the base
model as `parent`. Names map to LoRARequests with ids never reused, so the prefix cache and the
worker's slots never confuse an adapter with one loaded earlier under the same name.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from turbollm.core.lora_request import LoRARequest
from turbollm.server.errors import APIError


def parse_lora_modules(items: list[str] | None) -> dict[str, str]:
    """['name=path', ...] -> {name: path}; ValueError for a malformed or repeated item."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules takes name=path items, got {item!r}")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        out[name.strip()] = path.strip()
    return out


class LoRAAdapters:
    """name -> LoRARequest of the adapters this server serves."""

    def __init__(self, base_name: str, modules: dict[str, str], allowed_dir: str | None):
        self.base_name = base_name
        # adapters loaded at run time must lie inside this directory (None: no runtime loads)
        self.allowed_dir = None if allowed_dir is None else Path(allowed_dir).resolve()
        self._ids = itertools.count(1)
        self.by_name: dict[str, LoRARequest] = {}
        for name, path in modules.items():
            self.by_name[name] = self.new_request(name, path)

    def new_request(self, name: str, path: str) -> LoRARequest:
        """A LoRARequest with a fresh id; 400 if the name is taken."""
        self.check_name(name)
        return LoRARequest(name, next(self._ids), str(Path(path).resolve()))

    def check_name(self, name: str) -> None:
        if name == self.base_name:
            raise APIError(400, f"{name!r} is the base model's name", "lora_name",
                           "invalid_value")
        if name in self.by_name:
            raise APIError(400, f"a LoRA adapter named {name!r} is already loaded", "lora_name",
                           "invalid_value")

    def get(self, name: str | None) -> LoRARequest | None:
        return None if name is None else self.by_name.get(name)

    def check_runtime_path(self, path: str) -> str:
        """The resolved path of an adapter to load at run time; 400 outside the allowed
        directory (links resolved first, so none leads out of it)."""
        if self.allowed_dir is None:
            raise APIError(400, "loading LoRA adapters at run time is off: start the server "
                                "with --lora-dir DIR", "lora_path", "invalid_value")
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(self.allowed_dir):
            raise APIError(400, "lora_path must be inside the server's --lora-dir",
                           "lora_path", "invalid_value")
        return str(resolved)

    def cards(self, created: int) -> list[dict]:
        """/v1/models entries of the adapters."""
        # (no "root" path: where the server keeps files is not the clients' business)
        return [{"id": name, "object": "model", "created": created, "owned_by": "turbollm",
                 "parent": self.base_name} for name in self.by_name]
