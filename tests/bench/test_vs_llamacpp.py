"""The alternating ours-vs-llama.cpp decode comparison (python -m turbollm.bench.vs_llamacpp)."""
import sys

from turbollm import LLM
from turbollm.bench import vs_llamacpp


def test_decode_rates_count_tokens_after_the_first(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", num_threads=1)
    assert vs_llamacpp.ours_rate(llm, [5, 6, 7], 8) > 0

    class FakeLlama:  # llama-cpp-python's generator: one token per next(), forever
        def __init__(self):
            self.made = 0

        def generate(self, prompt, **kw):
            while True:
                self.made += 1
                yield 1
    fake = FakeLlama()
    assert vs_llamacpp.llamacpp_rate(fake, [1, 2], 8) > 0
    assert fake.made == 9  # the first token (after the prefill) plus the 8 that are timed


def test_without_llama_cpp_it_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    assert vs_llamacpp.main([]) == 2
    assert "not installed" in capsys.readouterr().out


def test_runs_alternate_and_ratios_use_best_rounds():
    order = []
    runs = {name: (lambda name=name: order.append(name) or {"a": 2.0, "b": 1.0}[name])
            for name in ("a", "b")}
    rates = vs_llamacpp.alternate(runs, 3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert rates == {"a": [2.0] * 3, "b": [1.0] * 3}
    r = vs_llamacpp.ratios({"llamacpp": [50.0, 100.0], "default": [80.0, 110.0],
                            "bf16": [40.0, 44.0]})
    assert r == {"default/llamacpp": 1.1, "bf16/llamacpp": 0.44, "default/bf16": 2.5}


def test_unknown_configuration_is_refused(capsys):
    assert vs_llamacpp.main(["--configs", "nope", "--no-llamacpp"]) == 2
    assert "unknown configuration" in capsys.readouterr().out
