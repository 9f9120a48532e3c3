"""A tensor-parallel rank reads its own slices of a safetensors checkpoint, not the whole model
(loader/lazy_tensor.py): built here in one process with a rank's ParallelState (loading needs
no collective), compared slice by slice with the checkpoint."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from turbollm.attention.selector import get_attention_backend
from turbollm.config import ModelConfig
from turbollm.distributed.parallel_state import CommCounters, ParallelState, TPGroup
from turbollm.loader.lazy_tensor import LazyTensor, iter_safetensors_lazy
from turbollm.loader.safetensors import safetensors_files
from turbollm.worker.model_loader import load_model


def _checkpoint(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_lazy_tensor_reads_only_what_is_asked(tiny_llama):
    full = _checkpoint(tiny_llama)
    name, lazy = next((n, t) for n, t in iter_safetensors_lazy(tiny_llama, torch.float32)
                      if n.endswith("down_proj.weight"))
    before = LazyTensor.elements_read
    cols = lazy.narrow(1, 32, 64)
    rows = lazy.to(torch.bfloat16)[3:900]  # past the end: the rows there are, as a tensor gives
    assert torch.equal(cols, full[name][:, 32:96].float())
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, full[name][3:].bfloat16())
    assert LazyTensor.elements_read - before == cols.numel() + rows.numel()
    assert lazy.shape == full[name].shape


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_a_tensor_parallel_rank_loads_its_slices_and_reads_little_more(tiny_llama, tp_rank):
    full = _checkpoint(tiny_llama)
    ps = ParallelState(rank=tp_rank, world_size=2, tp_rank=tp_rank, tp_size=2, pp_rank=0,
                       pp_size=1, tp=TPGroup(2, tp_rank, None, None, CommCounters()))
    before = LazyTensor.elements_read
    model = load_model(ModelConfig(model=str(tiny_llama), dtype="float32"), "cpu",
                       get_attention_backend("torch"), ps).model
    read = LazyTensor.elements_read - before
    total = sum(t.numel() for t in full.values())
    # the layers' weights are split in two; norms (and nothing else) are read whole
    norms = sum(t.numel() for n, t in full.items() if "norm" in n)
    assert read == (total - norms) // 2 + norms
    layer = model.model.layers[0]
    q = full["model.layers.0.self_attn.q_proj.weight"]
    half = q.shape[0] // 2
    got_q = layer.self_attn.qkv_proj.weight[:half]
    assert torch.equal(got_q, q[tp_rank * half:(tp_rank + 1) * half])
    down = full["model.layers.0.mlp.down_proj.weight"]
    cols = down.shape[1] // 2
    assert torch.equal(layer.mlp.down_proj.weight,
                       down[:, tp_rank * cols:(tp_rank + 1) * cols])
