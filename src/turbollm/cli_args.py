"""Generate argparse flags from config dataclasses (one source of truth for options)."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from turbollm.config import (CacheConfig, DeviceConfig, KernelConfig, LoRAConfig, ModelConfig,
                             ParallelConfig, SchedulerConfig, SpeculativeConfig)

ENGINE_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig, SpeculativeConfig,
                   KernelConfig, LoRAConfig, ParallelConfig)


def _base_type(hint):
    """int | None -> int; bool -> bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """One --flag per field (underscores become dashes); fields with metadata cli=False skipped."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = f.default if f.default is not MISSING else None
        kind = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=default,
                               choices=f.metadata.get("choices"),
                               help=f"{help_text} (default: {default})")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    for cls in ENGINE_SECTIONS:
        add_dataclass_args(parser, cls)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine's keyword arguments out of parsed CLI args."""
    out = {}
    for cls in ENGINE_SECTIONS:
        for f in fields(cls):
            if f.metadata.get("cli", True) is not False and hasattr(args, f.name):
                out[f.name] = getattr(args, f.name)
    return out


def parse_value(text: str):
    """'4' -> 4, '0.5' -> 0.5, 'true'/'false' -> bool, 'null' -> None, else the string
    ('none' stays a string: it is a value of several options, e.g. quantization=none)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_overrides(items: list[str] | str | None) -> dict:
    """['dtype=float32', 'quantization=int4,kv_cache_dtype=int8'] -> engine kwargs."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {part!r}")
            out[key.strip().replace("-", "_")] = parse_value(value)
    return out
