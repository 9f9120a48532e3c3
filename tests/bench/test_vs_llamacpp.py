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
