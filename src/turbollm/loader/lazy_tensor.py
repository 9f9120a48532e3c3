"""A checkpoint tensor read only as far as it is used: what a tensor- or pipeline-parallel rank
loads through (worker/model_loader.py), so that it reads its slices and not the whole model.

Each tensor-parallel layer's weight_loader narrows the checkpoint tensor it gets to the rank's
rows or columns (layers/parallel_linear.py); given a LazyTensor, that narrow reads just those
bytes from the safetensors file (safetensors' get_slice), and a pipeline stage reads nothing of
another stage's tensors. Everything else calls `materialize` for the whole tensor.
LazyGGUFTensor does the same for a GGUF tensor: it dequantizes only the rows, or the whole
quantization blocks of columns, that are asked for (the file is mapped, so nothing else is read).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from safetensors import SafetensorError, safe_open

from turbollm.loader.errors import CheckpointError
from turbollm.loader.gguf_dequant import dequantize
from turbollm.loader.safetensors import cast_floats, safetensors_files


class LazyTensor:
    """One tensor of an open safetensors file (a get_slice handle), cast to `dtype` (floats
    only) when read. `elements_read` counts what was read, for tests and logs."""

    elements_read = 0  # over every LazyTensor of the process

    def __init__(self, handle, dtype: torch.dtype | None):
        self.handle, self.dtype = handle, dtype
        self.shape = torch.Size(handle.get_shape())

    def to(self, dtype: torch.dtype) -> "LazyTensor":
        return LazyTensor(self.handle, dtype)

    def _read(self, index) -> torch.Tensor:
        t = self.handle[index]
        LazyTensor.elements_read += t.numel()
        return t if self.dtype is None else cast_floats(t, self.dtype)

    def materialize(self) -> torch.Tensor:
        return self._read(tuple(slice(None) for _ in self.shape))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._read(tuple(index))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows along dim 0 (a slice; past the end: fewer rows, as a tensor would give)."""
        if not isinstance(rows, slice):
            raise TypeError("LazyTensor reads row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        return self.narrow(0, start, max(0, stop - start))


class LazyGGUFTensor:
    """One tensor of a GGUFCheckpoint, dequantized to `dtype` only as far as it is read: rows,
    or columns at quantization-block boundaries (other column ranges dequantize the rows whole
    first). `elements_read` counts the dequantized elements, for tests and logs."""

    elements_read = 0  # over every LazyGGUFTensor of the process

    def __init__(self, checkpoint, hf_name: str, dtype: torch.dtype):
        self.checkpoint, self.hf_name, self.dtype = checkpoint, hf_name, dtype
        self.ggml_type = checkpoint.ggml_type(hf_name)
        self.shape = torch.Size(checkpoint.shape(hf_name))
        self._block = GGML_QUANT_SIZES[self.ggml_type][0]

    def to(self, dtype: torch.dtype) -> "LazyGGUFTensor":
        return LazyGGUFTensor(self.checkpoint, self.hf_name, dtype)

    def _read(self, shape: tuple[int, ...], rows=None, cols=None) -> torch.Tensor:
        """Rows [start, stop) and columns [first, end) (GGUFCheckpoint.raw_part), dequantized."""
        raw = self.checkpoint.raw_part(self.hf_name, rows, cols)
        t = dequantize(self.ggml_type, np.ascontiguousarray(raw), shape).to(self.dtype)
        LazyGGUFTensor.elements_read += t.numel()
        return t

    def materialize(self) -> torch.Tensor:
        return self._read(tuple(self.shape))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        end = start + length
        if dim == 0 or len(self.shape) == 1:
            return self._read((length, *self.shape[1:]), rows=(start, end))
        if start % self._block or (end % self._block and end != self.shape[1]):
            return self.materialize().narrow(dim, start, length)  # not on block boundaries
        return self._read((self.shape[0], length), cols=(start, end))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows along dim 0 (a slice; past the end: fewer rows, as a tensor would give)."""
        if not isinstance(rows, slice):
            raise TypeError("LazyGGUFTensor reads row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        return self.narrow(0, start, max(0, stop - start))


def iter_safetensors_lazy(model_dir: Path, dtype: torch.dtype):
    """(hf_name, LazyTensor) for every tensor of every shard: nothing is read until the
    consumer asks; each must be read before the next is taken (its file closes after)."""
    for file in safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in list(f.keys()):
                    yield name, LazyTensor(f.get_slice(name), dtype)
        except SafetensorError as e:
            raise CheckpointError(file, f"not a readable safetensors file ({e})") from None
