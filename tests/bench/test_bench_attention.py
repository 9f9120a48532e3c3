"""The attention micro-benchmark runs its calls (and, in a git checkout, builds the kernel at
another revision to compare with)."""
import subprocess
from pathlib import Path

import pytest

from turbollm.attention import native
from turbollm.bench import attention

pytestmark = pytest.mark.skipif(native.lib() is None,
                                reason="no AVX2/FMA/F16C CPU or no C compiler")


def test_run_times_every_cache_context_and_row_count(monkeypatch):
    def run_once(fns, iters, rounds):
        return [float(i + 1) for i, f in enumerate(fns) if f() is not None]
    monkeypatch.setattr(attention, "best_times_us", run_once)
    results = attention.run(["f32", "bf16"], None, contexts=(40, 300), row_counts=(1, 3),
                            layers=2)
    assert [(r["cache"], r["context"], r["rows"]) for r in results] == [
        (d, c, n) for d in ("f32", "bf16") for c in (40, 300) for n in (1, 3)]
    assert all(r["us"] == {"current": 1.0} for r in results)


def _in_git_checkout() -> bool:
    root = Path(attention.__file__).resolve().parents[3]
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout")
def test_the_kernel_at_head_loads_and_gives_the_current_answer():
    import torch
    lib = attention.library_at("HEAD")
    kc = torch.randn(8, attention.BLOCK, attention.KV_HEADS, attention.HEAD_DIM)
    vc = torch.randn_like(kc)
    tables = torch.randperm(8).unsqueeze(0)
    outs = []
    for which in (lib, native.lib()):
        torch.manual_seed(0)  # the same queries for both
        call = attention.attention_call(which, [(kc, vc)], tables, rows=2, ctx=50)
        outs.append(call()[0].clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
