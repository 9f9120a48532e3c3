"""Hugging Face directory checkpoints: config.json + (sharded) *.safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from turbollm.loader.errors import CheckpointError


def read_hf_config(model_dir: Path) -> dict:
    """Parsed config.json of an HF model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "not a JSON object")
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shard files, from model.safetensors.index.json when present."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    return files


def iter_safetensors_raw(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every tensor of every shard, as stored."""
    for file in safetensors_files(model_dir):
        # safetensors checks the header (its length, JSON, offsets within the file) before it
        # hands out a tensor; its error becomes ours, with the file named
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(file, f"not a readable safetensors file ({e})") from None


def cast_floats(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype if it holds floats; integer tensors (packed weights, indices) as they are."""
    return t.to(dtype) if t.is_floating_point() else t


def iter_safetensors(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every tensor of every shard, cast to dtype (floats only)."""
    for name, t in iter_safetensors_raw(model_dir):
        yield name, cast_floats(t, dtype)
