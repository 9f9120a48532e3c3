"""CheckpointError: a model file that cannot be read, said in one line (file, what, where)."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated or not what it claims to be."""

    def __init__(self, path: str | Path, what: str, offset: int | None = None) -> None:
        self.path, self.what, self.offset = Path(path), what, offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}: {what}{where}")
