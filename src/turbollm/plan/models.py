"""Model presets as Hugging Face config.json dicts, and loading any config.json.

The presets carry the architecture fields of the published config.json files (values as
released on the Hugging Face Hub); everything else is derived by `ModelArch.from_hf_config`,
the same parser the engine's loaders use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from turbollm.model_arch import ModelArch
from turbollm.model_presets import PRESETS, norm_name, preset_config


def load_model(spec: str) -> tuple[str, ModelArch]:
    """Resolve a preset name, a config.json path or a directory holding one -> (name, arch)."""
    cfg = preset_config(spec)
    if cfg is not None:
        name = next(p for p in PRESETS if norm_name(p) == norm_name(spec))
        return name, ModelArch.from_hf_config(cfg)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) "
                         "and no config.json at that path")
    cfg = json.loads(path.read_text())
    name = cfg.get("_name_or_path") or path.parent.name or path.stem
    return str(name), ModelArch.from_hf_config(cfg)
