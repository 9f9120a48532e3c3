"""The compressed-tensors sparse layouts (loader/compressed_tensors.py): exact round trips, the
layout details other producers rely on, and a directory written by hand in that layout (as
llm-compressor would) read back dense through the checkpoint iterator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from turbollm.loader.compressed_tensors import (BITMASK, SPARSE_24, compress_24, compress_bitmask,
                                                compress_state_dict, decompress,
                                                iter_compressed_tensors, sparsity_config,
                                                sparsity_entry)


def _sparse(rows, cols, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w * (torch.rand(rows, cols, generator=g) < density)


def _two_four(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).topk(2, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return (w * mask.reshape(rows, cols)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [64, 37])  # 37: the last bitmask byte is partly padding
def test_bitmask_round_trip_is_exact(dtype, cols):
    w = _sparse(19, cols, 0.4, dtype)
    parts = compress_bitmask(w)
    assert parts["compressed"].dtype == dtype
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].shape == (19, -(-cols // 8))
    back = decompress(parts)
    assert back.dtype == dtype and torch.equal(back, w)


def test_bitmask_layout_matches_the_documented_one():
    w = torch.zeros(2, 10)
    w[0, 0], w[0, 9], w[1, 3] = 1.5, -2.0, 3.0
    parts = compress_bitmask(w)
    # bit k of byte j is column 8j + k ("little" bit order): column 9 -> byte 1, bit 1
    assert parts["bitmask"].tolist() == [[1, 2], [8, 0]]
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0]
    assert parts["row_offsets"].tolist() == [0, 2]
    assert parts["shape"].tolist() == [2, 10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_round_trip_is_exact_and_half_size(dtype):
    w = _two_four(24, 64, dtype)
    parts = compress_24(w)
    assert parts["compressed"].shape == (24, 32)
    assert parts["shape"].shape == (2, 1)
    assert torch.equal(decompress(parts), w)


def test_24_keeps_a_stored_zero_when_a_group_has_fewer_than_two():
    w = _two_four(4, 16, torch.float32)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    parts = compress_24(w)
    assert torch.equal(decompress(parts), w)


def test_24_refuses_a_weight_that_is_not_2_of_4():
    w = _two_four(4, 16, torch.float32)
    w[1, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="more than 2"):
        compress_24(w)


def test_decompress_checks_value_count():
    parts = compress_bitmask(_sparse(8, 16, 0.5, torch.float32))
    parts["compressed"] = parts["compressed"][:-1]
    with pytest.raises(ValueError, match="keeps"):
        decompress(parts)


def _write_dir(tmp_path, tensors, qc):
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": qc}))


@pytest.mark.parametrize("fmt", [BITMASK, SPARSE_24])
def test_directory_round_trip_through_the_checkpoint_reader(tmp_path, fmt):
    dense = {"model.layers.0.mlp.down_proj.weight": _two_four(16, 32, torch.bfloat16, 1),
             "model.layers.0.self_attn.q_proj.weight": _two_four(32, 16, torch.bfloat16, 2),
             "model.norm.weight": torch.randn(16).to(torch.bfloat16)}
    stored = compress_state_dict(dense, fmt, lambda n: ".layers." in n)
    assert "model.layers.0.mlp.down_proj.bitmask" in stored
    assert "model.layers.0.mlp.down_proj.weight" not in stored
    _write_dir(tmp_path, stored, sparsity_entry(fmt, "2:4", 0.5))
    assert sparsity_config(tmp_path)["format"] == fmt
    back = dict(iter_compressed_tensors(tmp_path, torch.bfloat16))
    assert set(back) == set(dense)
    for name, t in dense.items():
        assert torch.equal(back[name], t), name


def test_reads_another_producers_layout(tmp_path):
    """Tensors built from the format description alone (numpy packbits, int64 shape, an old
    'compression_config' block), not by our writer."""
    w = _sparse(6, 20, 0.3, torch.float16, seed=3)
    mask = (w != 0).numpy()
    tensors = {"model.layers.0.mlp.up_proj.shape": torch.tensor([6, 20]),
               "model.layers.0.mlp.up_proj.compressed": w[w != 0],
               "model.layers.0.mlp.up_proj.bitmask":
                   torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little")),
               "model.layers.0.mlp.up_proj.row_offsets":
                   torch.from_numpy(np.concatenate([[0], np.cumsum(mask.sum(1))[:-1]]))}
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"compression_config": {
        "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 0.7}}}))
    assert sparsity_config(tmp_path) is not None
    back = dict(iter_compressed_tensors(tmp_path, torch.float32))
    assert torch.equal(back["model.layers.0.mlp.up_proj.weight"], w.float())


def test_quantized_compressed_tensors_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": {}}}}))
    with pytest.raises(ValueError, match="not supported yet"):
        sparsity_config(tmp_path)


def test_other_quantization_configs_are_not_ours(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    assert sparsity_config(tmp_path) is None
