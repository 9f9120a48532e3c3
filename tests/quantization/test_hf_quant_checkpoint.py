"""AutoAWQ-GEMM and GPTQ checkpoint layouts: bit layout against a hand-written reader of the
documented format, write -> read round trips, and whole checkpoints loaded by LLM(dir)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbollm.quantization import kernels
from turbollm.loader.awq_gptq import (awq_pack, awq_unpack, gptq_pack, gptq_unpack,
                                                 prequantized_config, write_quantized_checkpoint)
from turbollm.quantization.int4_result import Int4Weights


def random_int4(out_f, in_f, G, perm=False, seed=0) -> Int4Weights:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // G, generator=g) * 0.1 + 1e-3).half().float()
    zeros = torch.randint(1, 16, (out_f, in_f // G), generator=g).float()
    p = torch.randperm(in_f, generator=g) if perm else None
    return Int4Weights(q, scales, zeros, G, p)


# ----- a reader written from the layouts' documentation, one value at a time -----
def nibble(word: int, i: int) -> int:
    return (word >> (4 * i)) & 15  # python ints: word is the int32's two's-complement value


def doc_awq_dequant(t, G):
    """AutoAWQ GEMM: qweight [in, out/8]; word c of row r holds columns 8c + (0,2,4,6,1,3,5,7)."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qw, qz, sc = t["qweight"].tolist(), t["qzeros"].tolist(), t["scales"].float()
    in_f, out_f = len(qw), len(qw[0]) * 8
    w = torch.empty(out_f, in_f)
    for r in range(in_f):
        for c in range(out_f // 8):
            for i in range(8):
                col = 8 * c + order[i]
                z = nibble(qz[r // G][c], i)
                w[col, r] = (nibble(qw[r][c], i) - z) * sc[r // G, col]
    return w


def doc_gptq_dequant(t, v1: bool):
    """GPTQ: qweight [in/8, out] (word r holds rows 8r..8r+7), qzeros [groups, out/8] in order,
    g_idx per input row; the classic format stores zero - 1."""
    qw, qz, sc = t["qweight"].tolist(), t["qzeros"].tolist(), t["scales"].float()
    g_idx = t["g_idx"].tolist()
    in_f, out_f = len(qw) * 8, len(qw[0])
    w = torch.empty(out_f, in_f)
    for r in range(in_f):
        g = g_idx[r]
        for col in range(out_f):
            z = nibble(qz[g][col // 8], col % 8) + (1 if v1 else 0)
            w[col, r] = (nibble(qw[r // 8][col], r % 8) - z) * sc[g, col]
    return w


def test_awq_layout_matches_documented_reader_and_round_trips():
    w = random_int4(16, 64, 32)
    t = awq_pack(w)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (64, 2)
    assert tuple(t["qzeros"].shape) == (2, 2) and tuple(t["scales"].shape) == (2, 16)
    torch.testing.assert_close(doc_awq_dequant(t, 32), w.dequantize(), rtol=0, atol=0)
    back = awq_unpack(t, 32)
    for a, b in ((back.qweight, w.qweight), (back.scales, w.scales), (back.zeros, w.zeros)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("perm", [False, True])
def test_gptq_layout_matches_documented_reader_and_round_trips(fmt, perm):
    w = random_int4(16, 64, 16, perm=perm, seed=1)
    t = gptq_pack(w, fmt)
    assert tuple(t["qweight"].shape) == (8, 16) and tuple(t["qzeros"].shape) == (4, 2)
    assert tuple(t["g_idx"].shape) == (64,)
    torch.testing.assert_close(doc_gptq_dequant(t, fmt == "gptq"), w.dequantize(), rtol=0, atol=0)
    back = gptq_unpack(t, 16, fmt)
    assert back.group_size == 16
    assert (back.perm is None) == (not perm)
    for a, b in ((back.dequantize(), w.dequantize()), (back.scales, w.scales),
                 (back.zeros, w.zeros)):
        assert torch.equal(a, b)


def test_gptq_ragged_last_group_reads_as_smaller_groups():
    """in=96 with group size 64 (GPTQ allows a short last group): 32-wide groups, same weights."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (8, 96), generator=g, dtype=torch.uint8)
    scales = torch.rand(2, 8, generator=g).half()
    zeros = torch.randint(1, 16, (2, 8), generator=g)
    from turbollm.loader.awq_gptq import pack_int4
    t = {"qweight": pack_int4(q).T.contiguous(), "qzeros": pack_int4(zeros - 1),
         "scales": scales, "g_idx": (torch.arange(96) // 64).to(torch.int32)}
    back = gptq_unpack(t, 64, "gptq")
    assert back.group_size == 32 and back.perm is None
    torch.testing.assert_close(back.dequantize(), doc_gptq_dequant(t, v1=True), rtol=0, atol=0)


def test_awq_layout_agrees_with_autoawq_when_installed():
    """Independent reader: AutoAWQ's own unpacking (awq/utils/packing_utils.py, torch only).
    autoawq is not a dependency (its install pulls GPU-only requirements), so this runs only
    where it is installed, e.g. `pip install --no-deps autoawq`."""
    spec = importlib.util.find_spec("awq")
    path = Path(spec.origin).parent / "utils" / "packing_utils.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("autoawq is not installed")
    mod_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)  # the file alone: the package __init__ needs CUDA deps
    w = random_int4(32, 128, 64, seed=3)
    t = awq_pack(w)
    theirs = mod.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 64)  # [in, out]
    torch.testing.assert_close(theirs.float().T, w.dequantize(), rtol=1e-3, atol=1e-3)


def test_prequantized_config_reads_both_methods_and_refuses_others(tmp_path):
    def cfg(qc):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
        return prequantized_config(tmp_path)
    assert cfg({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                "zero_point": True}) == {"method": "awq", "group_size": 128, "format": "gemm"}
    assert cfg({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}
               )["format"] == "gptq"
    assert cfg({"quant_method": "gptq", "bits": 4, "group_size": 64,
                "checkpoint_format": "gptq_v2"})["format"] == "gptq_v2"
    assert cfg({"quant_method": "bitsandbytes"}) is None
    with pytest.raises(ValueError, match="GEMM"):
        cfg({"quant_method": "awq", "bits": 4, "version": "gemv"})
    with pytest.raises(ValueError, match="8-bit"):
        cfg({"quant_method": "gptq", "bits": 8})


# ----- whole checkpoints -----
def _dense_reference_dir(qdir: Path, out: Path, method: str) -> Path:
    """A plain fp32 HF checkpoint holding what the documented readers make of `qdir`."""
    cfg = json.loads((qdir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    tensors = load_file(str(qdir / "model.safetensors"))
    dense = {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            parts = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")
                     if f"{prefix}.{k}" in tensors}
            dense[f"{prefix}.weight"] = (doc_awq_dequant(parts, qc["group_size"]) if method == "awq"
                                         else doc_gptq_dequant(parts, qc["checkpoint_format"] == "gptq"))
        elif suffix not in ("qzeros", "scales", "g_idx"):
            dense[name] = t.float()
    out.mkdir()
    save_file(dense, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    for f in qdir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_checkpoint_loads_and_matches_dequantized_reference(tiny_llama, tmp_path, method):
    from turbollm import LLM
    from turbollm.loader.safetensors import read_hf_config
    from calib_target import calibration_target
    from turbollm.worker.calibration import apply_calibrated_quantization

    kw = dict(dtype="float32", device="cpu", num_threads=1, kv_cache_memory="16MiB")
    src = LLM(str(tiny_llama), **kw)
    extra = {"act_order": True} if method == "gptq" else {"n_grid": 5}
    apply_calibrated_quantization(calibration_target(src), method, 32, num_windows=4, window_len=64,
                                  progress=False, **extra)
    qdir = write_quantized_checkpoint(src.engine.executor.worker.model, read_hf_config(tiny_llama),
                                      tmp_path / "q", method, src.tokenizer)
    ref_dir = _dense_reference_dir(qdir, tmp_path / "ref", method)

    ids = src.tokenizer("def f(x):\n    return x * 2  # a tiny test").input_ids
    loaded = LLM(str(qdir), **kw)
    quantized_layers = [m for m in loaded.engine.executor.worker.model.modules() if "int4" in
                        getattr(getattr(m, "quant_method", None), "name", "")]
    assert len(quantized_layers) == 2 * 4  # every decoder linear runs the int4 kernel
    # fp32 activations: up to 16 rows are otherwise rounded to int16 (~2e-5 relative; tested
    # on its own in test_int4_linear), and this compares the weights, not that rounding
    kernels.exact_activations(True)
    try:
        got = loaded.score_logits(ids)
    finally:
        kernels.exact_activations(False)
    want = LLM(str(ref_dir), **kw).score_logits(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the source model (fp16 rounding of its norms/embeddings aside) agrees closely too
    torch.testing.assert_close(got, src.score_logits(ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["gptq"])  # the AWQ writer is covered above
def test_quantize_cli_writes_a_loadable_directory(tiny_llama, tmp_path, method):
    """`turbollm quantize --method awq|gptq`: calibrate, quantize, write the layout; LLM(dir)
    serves it as int4 without calibrating again."""
    from turbollm import LLM
    from turbollm.cli import main
    out = tmp_path / method
    assert main(["quantize", "--model", str(tiny_llama), "--method", method, "--group-size",
                 "32", "--output", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == 32
    assert (out / "tokenizer.json").is_file()
    llm = LLM(str(out), dtype="float32", quantization=method, num_threads=1,
              kv_cache_memory="16MiB")  # already quantized: served as it is
    assert llm.engine.executor.worker.model.checkpoint_quantization == method
    layers = [m for n, m in llm.engine.executor.worker.model.named_modules() if ".layers." in n
              and hasattr(m, "quant_method")]
    assert layers and all(m.quant_method.name == "int4" for m in layers)
