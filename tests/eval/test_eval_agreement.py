"""Agreement measures and the `turbollm eval` command on the tiny model."""
import json
import math

import pytest
import torch

from turbollm.eval.agreement import greedy_agreement, logit_agreement


def test_greedy_agreement_counts():
    a = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1]]
    b = [[1, 2, 3, 4], [5, 9, 7, 8], [1]]
    g = greedy_agreement(a, b)
    assert g.num_prompts == 3 and g.num_tokens == 10
    assert g.token_agreement == pytest.approx(8 / 10)  # one flip, one missing token
    assert g.exact_match == pytest.approx(1 / 3)
    assert g.prefix_agreement == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])


def test_logit_agreement_of_known_distributions():
    """KL and top-1 agreement equal a direct computation on fixed random logits."""
    gen = torch.Generator().manual_seed(0)
    la, lb = torch.randn(40, 11, generator=gen), torch.randn(40, 11, generator=gen)
    ids = torch.randint(0, 11, (40,), generator=gen).tolist()
    r = logit_agreement(lambda t: la[:len(t)], lambda t: lb[:len(t)], ids, max_length=40,
                        stride=39)
    pa, lpa, lpb = la[:39].softmax(-1), la[:39].log_softmax(-1), lb[:39].log_softmax(-1)
    assert r.num_tokens == 39
    assert r.mean_kl == pytest.approx(float((pa * (lpa - lpb)).sum(-1).mean()), rel=1e-5)
    assert r.top1_agreement == pytest.approx(
        float((la[:39].argmax(-1) == lb[:39].argmax(-1)).float().mean()))
    same = logit_agreement(lambda t: la[:len(t)], lambda t: la[:len(t)], ids, 40, 39)
    assert same.top1_agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-7)


def _eval(args, tmp_path, name):
    from turbollm.cli import main
    out = tmp_path / f"{name}.json"
    assert main(["eval", *args, "--json", str(out), "--no-progress", "--num-threads", "1",
                 "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_eval_perplexity_command_matches_transformers(tiny_llama, tmp_path):
    """`turbollm eval --perplexity` on a text file equals transformers' perplexity (fp32)."""
    import transformers

    from turbollm.eval.perplexity import perplexity
    from turbollm.loader.tokenizer import load_tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 12 + "Packed bytes and sockets."
    path = tmp_path / "text.txt"
    path.write_text(text)
    res = _eval(["--model", str(tiny_llama), "--perplexity", "--text", str(path),
                 "--max-length", "48", "--stride", "20", "--config-a", "dtype=float32"],
                tmp_path, "ppl")
    ids = list(load_tokenizer(tiny_llama)(text, add_special_tokens=False).input_ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama),
                                                           dtype=torch.float32).eval()

    def hf_score(tokens):
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0]

    ref = perplexity(hf_score, ids, 48, 20)
    assert res["num_tokens"] == ref.num_tokens == len(ids) - 1
    assert abs(res["perplexity"] / ref.perplexity - 1) < 1e-3


def test_eval_compare_self_is_identical_and_dtype_differs(tiny_llama, tmp_path):
    common = ["--model", str(tiny_llama), "--compare", "--max-tokens", "200", "--max-length",
              "64", "--prompts", "3", "--prompt-tokens", "16", "--gen-tokens", "12"]
    same = _eval([*common, "--config-a", "dtype=float32", "--config-b", "dtype=float32"],
                 tmp_path, "same")
    assert same["logits"]["top1_agreement"] == 1.0
    assert same["logits"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["logits"]["num_tokens"] == 199
    assert same["greedy"]["token_agreement"] == 1.0 and same["greedy"]["exact_match"] == 1.0
    assert same["greedy"]["num_tokens"] == 36

    diff = _eval([*common, "--config-a", "dtype=float32", "--config-b", "dtype=bfloat16"],
                 tmp_path, "diff")
    assert diff["logits"]["mean_kl"] > 1e-6  # bf16 weights round: distributions move
    assert diff["logits"]["perplexity_a"] == pytest.approx(same["logits"]["perplexity_a"])
    assert math.isfinite(diff["logits"]["perplexity_b"])
    assert diff["logits"]["perplexity_b"] != diff["logits"]["perplexity_a"]


def test_eval_rejects_bad_config(tiny_llama, capsys):
    from turbollm.cli import main
    assert main(["eval", "--model", str(tiny_llama), "--compare", "--config-b", "dtype"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
