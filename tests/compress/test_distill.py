"""compress/distill.py on a tiny random 4-layer teacher: losses, a layer-dropped student that
gets closer to its teacher on held-out text, output that transformers and turbollm load with
the same logits, a LoRA adapter PEFT loads, and resume that ends where an unbroken run ends."""
from __future__ import annotations

import json

import pytest
import torch

from turbollm.compress import distill as distill_mod
from turbollm.compress.distill import DistillConfig, distill
from turbollm.compress.distill_losses import distill_loss

# fp32: the tests compare the report with transformers' fp32 forward of the written model
SMALL = dict(steps=16, batch_size=4, seq_len=32, eval_sequences=4, num_threads=1, lr=3e-3,
             precision="float32")


@pytest.fixture(scope="module")
def teacher(tiny_model_factory):
    """A tiny random Llama with 4 layers, so a layer-dropped student has somewhere to come
    from."""
    return tiny_model_factory("llama4")


def test_losses():
    torch.manual_seed(0)
    p, q = torch.randn(5, 50), torch.randn(5, 50)
    for kind in ("forward_kl", "reverse_kl", "tv"):
        assert distill_loss(kind, p, p).abs() < 1e-6 and distill_loss(kind, q, p) > 0.01
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    fwd = (lp.exp() * (lp - lq)).sum(-1).mean()
    torch.testing.assert_close(distill_loss("forward_kl", q, p), fwd)
    torch.testing.assert_close(distill_loss("reverse_kl", p, q), fwd)  # KL(p||q) either way
    tv = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1).mean()
    torch.testing.assert_close(distill_loss("tv", q, p), tv)
    mask = torch.tensor([1, 0, 0, 0, 0])
    torch.testing.assert_close(distill_loss("tv", q, p, mask),
                               0.5 * (lp[0].exp() - lq[0].exp()).abs().sum())
    with pytest.raises(ValueError, match="loss"):
        distill_loss("mse", q, p)


def test_layer_dropped_student_gets_closer_and_loads_everywhere(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from turbollm import LLM
    out = tmp_path / "student"
    report = distill(DistillConfig(teacher=str(teacher), out=str(out), student_layers=2,
                                   **SMALL), progress=False)
    before, after = report["before"], report["after"]
    assert after["loss_to_teacher"] < 0.9 * before["loss_to_teacher"]
    assert after["one_minus_tv"] > before["one_minus_tv"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not (out / distill_mod.CHECKPOINT).exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    again = held_out_numbers(hf, teacher, DistillConfig(
        teacher=str(teacher), out=str(out), student_layers=2, **SMALL))
    for k, v in after.items():
        assert again[k] == pytest.approx(v, rel=1e-4), k
    ids = [1, 400, 23, 9001, 77, 5, 310, 2048]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = LLM(model=str(out), dtype="float32", kv_cache_memory="8MiB",
               num_threads=1).score_logits(ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_for_draft_from_the_command_line(teacher, tmp_path, capsys):
    """`turbollm distill --for-draft`: TV on the teacher's own generations, a report; matmuls
    in bf16 (autocast), which still trains."""
    from turbollm.cli import main
    out = tmp_path / "d"
    assert main(["distill", "--teacher", str(teacher), "--student-layers", "1", "--for-draft",
                 "--out", str(out), "--steps", "16", "--batch-size", "4", "--seq-len", "32",
                 "--lr", "3e-3", "--num-threads", "1", "--precision", "bfloat16"]) == 0
    report = json.loads((out / distill_mod.REPORT).read_text())
    assert (report["config"]["loss"], report["config"]["data"]) == ("tv", "teacher")
    assert report["after"]["one_minus_tv"] > report["before"]["one_minus_tv"]
    assert report["before"]["teacher_perplexity"] == report["after"]["teacher_perplexity"]
    printed = capsys.readouterr().out
    assert "top-1 agree" in printed and "of the gap recovered" in printed


def held_out_numbers(model, teacher_dir, cfg: DistillConfig) -> dict:
    """The report's held-out numbers, recomputed for `model` as loaded from disk."""
    from turbollm.compress.trainable import load_trainable
    teacher, _, tok = load_trainable(str(teacher_dir))
    _, held = distill_mod.training_text(cfg, tok)
    return distill_mod.evaluate(model, teacher.eval(), held, cfg.loss, cfg.temperature)


def test_lora_adapter_loads_in_peft_with_the_trained_outputs(teacher, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from turbollm.compress.trainable import drop_layers, load_trainable, save_hf
    from turbollm.loader.peft_adapter import load_peft_adapter
    net, cfg, tok = load_trainable(str(teacher))
    base = save_hf(drop_layers(net, [0, 3]), cfg, tok, tmp_path / "base")
    out = tmp_path / "adapter"
    dcfg = DistillConfig(teacher=str(teacher), out=str(out), student=str(base), lora_rank=4,
                         **SMALL)
    report = distill(dcfg, progress=False)
    assert report["after"]["loss_to_teacher"] < report["before"]["loss_to_teacher"]
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(out)).eval()
    again = held_out_numbers(peft, teacher, dcfg)
    for k, v in report["after"].items():
        assert again[k] == pytest.approx(v, rel=1e-4), k
    adapter = load_peft_adapter(out)  # what the server reads
    assert adapter.rank == 4 and len(adapter.weights) == 2 * 7


def test_resume_ends_where_an_unbroken_run_ends(teacher, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    distill(DistillConfig(teacher=str(teacher), out=str(whole), student_layers=1,
                          checkpoint_every=8, **SMALL), progress=False)
    broken = tmp_path / "broken"
    real = distill_mod._lr_at

    def stop_at_11(step, total, peak):
        if step == 11:
            raise KeyboardInterrupt
        return real(step, total, peak)
    monkeypatch.setattr(distill_mod, "_lr_at", stop_at_11)
    cfg = DistillConfig(teacher=str(teacher), out=str(broken), student_layers=1,
                        checkpoint_every=8, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, progress=False)
    assert (broken / distill_mod.CHECKPOINT).is_file()
    monkeypatch.setattr(distill_mod, "_lr_at", real)
    cfg.resume = True
    distill(cfg, progress=False)
    from safetensors.torch import load_file
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_are_refused(teacher):
    with pytest.raises(ValueError, match="exactly one"):
        DistillConfig(teacher=str(teacher), out="x")
    with pytest.raises(ValueError, match="LoRA adapter needs"):
        DistillConfig(teacher=str(teacher), out="x", student_layers=1, lora_rank=4)
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(teacher=str(teacher), out="x", student_layers=1, loss="mse")
