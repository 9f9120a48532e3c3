"""Pre-quantized fp8 checkpoints (quant_method "fp8", the AutoFP8 / vLLM layout), built here from
the layout's documented form: per-tensor and per-channel weight scales, static input scales."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbollm import LLM
from turbollm.loader.fp8_checkpoint import fp8_checkpoint_config

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write(src: Path, out: Path, per_channel: bool, static: bool) -> tuple[Path, Path]:
    """(fp8 checkpoint, dense fp32 checkpoint of exactly the weights it stands for)."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    fp8, dense = {}, {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix == "weight" and prefix.rpartition(".")[2] in LINEARS:
            w = t.float()
            amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
            scale = (amax / 448.0).clamp(min=1e-12)
            q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            fp8[name] = q
            fp8[f"{prefix}.weight_scale"] = scale.float()  # [out, 1] or a scalar
            if static:
                fp8[f"{prefix}.input_scale"] = torch.tensor(0.02)
            dense[name] = q.float() * scale
        else:
            fp8[name] = dense[name] = t.float()
    for d, tens, qc in ((out / "fp8", fp8, {"quant_method": "fp8", "activation_scheme":
                                             "static" if static else "dynamic"}),
                        (out / "dense", dense, None)):
        d.mkdir(parents=True)
        save_file(tens, str(d / "model.safetensors"))
        c = dict(cfg, torch_dtype="float32")
        if qc:
            c["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(c))
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (d / f.name).write_bytes(f.read_bytes())
    return out / "fp8", out / "dense"


@pytest.mark.parametrize("per_channel,static", [(False, True), (True, False)])
def test_fp8_checkpoint_serves_its_exact_weights(tiny_llama, tmp_path, per_channel, static):
    qdir, ref_dir = _write(tiny_llama, tmp_path, per_channel, static)
    kw = dict(dtype="float32", kv_cache_memory="8MiB")
    loaded = LLM(str(qdir), **kw)
    fp8_layers = [m for m in loaded.engine.executor.worker.model.modules()
                  if getattr(getattr(m, "quant_method", None), "name", "") == "fp8"]
    assert len(fp8_layers) == 2 * 4  # fused qkv / gate_up from per-shard scales, o, down
    ids = loaded.tokenizer("def f(x):\n    return x * 2  # a tiny test").input_ids
    ref = LLM(str(ref_dir), **kw)
    torch.testing.assert_close(loaded.score_logits(ids), ref.score_logits(ids),
                               rtol=1e-4, atol=1e-4)


def test_fp8_config_detection_and_refusals(tmp_path):
    def cfg(qc):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
        return fp8_checkpoint_config(tmp_path)
    assert cfg({"quant_method": "fp8", "activation_scheme": "dynamic"})["activation_scheme"] == "dynamic"
    assert cfg({"quant_method": "awq", "bits": 4}) is None
    with pytest.raises(ValueError, match="block-wise"):
        cfg({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="e4m3"):
        cfg({"quant_method": "fp8", "fmt": "e5m2"})
