"""The kernel micro-benchmark runs every variant through the engine's dispatch (its numbers are
measured by hand; here only that each variant ran and was timed)."""
import pytest

from turbollm.quantization import microbench


def test_microbench_times_every_variant():
    results = microbench.run([1, 3], shapes=[(64, 96)], max_iters=3)
    assert [r["rows"] for r in results] == [1, 3]
    for r in results:
        assert r["shape"] == "64x96" and r["bf16_us"] > 0
        assert all(r[k] > 0 for k in ("fp32", "int8", "int4", "fp8"))


def test_microbench_cli_prints_a_row_per_shape_and_count(capsys, monkeypatch):
    monkeypatch.setitem(microbench.SHAPES, "tiny", [(32, 64)])
    run = microbench.run
    monkeypatch.setattr(microbench, "run", lambda *a: run(*a, max_iters=3))
    assert microbench.main(["--rows", "2", "--shapes", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].split()[:2] == ["32x64", "2"] and out[-1].count("x") == 5  # the shape and 4 ratios


def test_microbench_cli_takes_the_kernel_variant(capsys, monkeypatch):
    """--cpu-isa fixes the C kernels' build before they load (the process's own one here: a
    test process cannot switch once a library is loaded) and names it in the header"""
    from turbollm import native_build
    isa = native_build.selected_isa()
    if isa is None:
        pytest.skip("no C kernels on this CPU")
    monkeypatch.setitem(microbench.SHAPES, "tiny", [(32, 64)])
    run = microbench.run
    monkeypatch.setattr(microbench, "run", lambda *a: run(*a, max_iters=3))
    assert microbench.main(["--rows", "1", "--shapes", "tiny", "--cpu-isa", isa]) == 0
    assert f"C kernels {isa}" in capsys.readouterr().out
