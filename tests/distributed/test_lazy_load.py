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


def test_lazy_gguf_tensor_dequantizes_only_what_is_asked(tmp_path):
    from gguf_helpers import tiny_gguf

    from turbollm.loader.gguf import GGUFCheckpoint
    from turbollm.loader.lazy_tensor import LazyGGUFTensor
    ckpt = GGUFCheckpoint(tiny_gguf(tmp_path / "tiny.gguf"))
    lazy = dict(ckpt.iter_tensors(torch.float32, lazy=True))
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    full_q, full_down = ckpt.get_tensor(q), ckpt.get_tensor(down)  # [64, 64], [64, 128] Q4_1
    before = LazyGGUFTensor.elements_read
    rows = lazy[q][16:48]  # HF rows of a rope-permuted tensor: gathered from the file's rows
    cols = lazy[down].narrow(1, 64, 64)  # whole 32-column blocks
    assert torch.equal(rows, full_q[16:48]) and torch.equal(cols, full_down[:, 64:])
    assert LazyGGUFTensor.elements_read - before == rows.numel() + cols.numel()
    odd = lazy[down].narrow(1, 40, 24)  # inside blocks: the rows whole, then the columns
    assert torch.equal(odd, full_down[:, 40:64])
    assert lazy[q].to(torch.bfloat16).materialize().dtype == torch.bfloat16


def test_a_tensor_parallel_rank_reads_its_gguf_slices(tmp_path, tiny_llama, monkeypatch):
    """Both GGUF reads of a TP = 2 rank take half of every split tensor: the dequantized
    weights the model is filled with, and the raw blocks its packed kernels are built from."""
    from gguf_helpers import tiny_gguf

    from turbollm.loader import gguf_native
    from turbollm.loader.gguf import GGUFCheckpoint
    from turbollm.loader.lazy_tensor import LazyGGUFTensor
    path = tiny_gguf(tmp_path / "tiny.gguf")
    ckpt = GGUFCheckpoint(path)
    full = {n: ckpt.get_tensor(n) for n in ckpt.hf_names()}
    raw_bytes = sum(ckpt.raw_part(n).nbytes for n in full if "norm" not in n)
    unpacked = []
    for unpack in ("q4_1_unpack", "q8_0_unpack"):
        real = getattr(gguf_native, unpack)
        monkeypatch.setattr(gguf_native, unpack, lambda raw, real=real: (
            unpacked.append(raw.nbytes), real(raw))[1])
    ps = ParallelState(rank=1, world_size=2, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1,
                       tp=TPGroup(2, 1, None, None, CommCounters()))
    before = LazyGGUFTensor.elements_read
    load_model(ModelConfig(model=str(path), tokenizer=str(tiny_llama), dtype="float32"), "cpu",
               get_attention_backend("torch"), ps)
    read = LazyGGUFTensor.elements_read - before
    total = sum(t.numel() for t in full.values())
    norms = sum(t.numel() for n, t in full.items() if "norm" in n)
    assert read == (total - norms) // 2 + norms
    # every linear packed (the tied head from the embedding's blocks), each from half its bytes
    assert len(unpacked) == 2 * 7 + 1 and sum(unpacked) == raw_bytes // 2
