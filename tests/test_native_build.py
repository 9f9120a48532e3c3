"""Per-ISA builds of the C kernels: every library compiles for every variant wherever gcc is
(a build error fails here, it never turns into skips), each variant runs the engine where the
CPU has its instructions, and the variant is chosen from the CPU's flags or by --cpu-isa."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import turbollm
from turbollm import native_build
from turbollm.native_build import ISA_VARIANTS, best_isa, build_library, supported_isas
from turbollm.platform_info import cpu_flags

SOURCES = sorted(Path(turbollm.__file__).parent.rglob("csrc/*.c"))
ZEN3 = frozenset({"avx2", "fma", "f16c", "avx", "sse4_2"})
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
               "avx512_vbmi2"}
COOPER_LAKE = ZEN4 - {"avx512_vbmi2"}  # BF16 without VBMI2: the avx2 build
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"}
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                               reason="no C compiler on this machine")


def test_the_five_libraries_are_found():
    assert {p.name for p in SOURCES} == {"lowbit.c", "paged_attn.c", "cpu_ops.c", "sparse.c",
                                         "shm_collectives.c"}


@needs_gcc
@pytest.mark.parametrize("isa", list(ISA_VARIANTS))
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_every_library_builds_for_every_variant(src, isa):
    path = build_library(src, isa)
    assert path.exists() and f"-{isa}-" in path.name


@pytest.mark.parametrize("flags, best, supported", [
    (ZEN3, "avx2", ["avx2"]),
    (ZEN4, "avx512", ["avx512", "avx2"]),
    (SAPPHIRE_RAPIDS, "amx", ["amx", "avx512", "avx2"]),
    (ZEN3 - {"f16c"}, None, []),
    (ZEN3 | {"avx512f", "avx512_vnni"}, "avx2", ["avx2"]),  # Ice Lake-like: no BF16
    (COOPER_LAKE, "avx2", ["avx2"]),
])
def test_the_variant_follows_the_cpu_flags(flags, best, supported):
    assert best_isa(flags) == best and supported_isas(flags) == supported


def test_select_isa_refuses_what_the_cpu_lacks_and_a_change_after_loading(monkeypatch):
    monkeypatch.setattr(native_build, "cpu_flags", lambda: ZEN3)
    monkeypatch.setattr(native_build, "_selected", None)
    monkeypatch.setattr(native_build, "_handles", {})
    with pytest.raises(ValueError, match="lacks .*avx512_vnni"):
        native_build.select_isa("avx512")
    with pytest.raises(ValueError, match="cpu_isa must be one of"):
        native_build.select_isa("sse2")
    assert native_build.select_isa("auto") == "avx2"
    monkeypatch.setattr(native_build, "cpu_flags", lambda: ZEN4)
    monkeypatch.setattr(native_build, "_handles", {("x.c", "avx2"): object()})
    with pytest.raises(ValueError, match="needs a new process"):
        native_build.select_isa("avx512")
    assert native_build.select_isa("avx2") == "avx2"


_RUN_VARIANT = """
import json, sys
from turbollm import LLM, SamplingParams, native_build
llm = LLM(dtype="float32", kv_cache_memory="64MiB", max_model_len=512, cpu_isa=sys.argv[1])
out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=20, temperature=0))
print(json.dumps({"tokens": list(out[0].outputs[0].token_ids),
                  "isa": llm.engine.system["isa"],
                  "libraries": sorted(f"{p.name}:{isa}" for p, isa in native_build._handles)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ISA_VARIANTS))
def test_each_variant_runs_the_pinned_greedy_tokens(isa):
    """The bundled model in fp32 (every decode step through our C kernels) with --cpu-isa:
    the variant's libraries are the ones loaded, and the tokens are the pinned ones."""
    missing = ISA_VARIANTS[isa][0] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))} for the {isa} variant")
    pinned = json.loads((Path(__file__).parent / "engine/fixtures/pinned_outputs.json")
                        .read_text())["fp32_math"]["fp32"][0]
    done = subprocess.run([sys.executable, "-c", _RUN_VARIANT, isa], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == isa
    assert set(got["libraries"]) == {f"{n}:{isa}" for n in ("lowbit.c", "paged_attn.c",
                                                             "cpu_ops.c")}
    assert got["tokens"] == pinned


def test_turbollm_info_names_the_cpu_the_variant_and_the_dtype():
    done = subprocess.run([sys.executable, "-m", "turbollm.cli", "info"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert lines["isa"] == (best_isa() or "none (torch kernels)")
    assert lines["dtype"] == "bfloat16" and lines["compute_dtype"] in ("bfloat16", "float32")
    assert lines["cpu"].strip("'") and "threads" in lines
    # what the engine built here would log (worker: system ... | prefill_dtype ...)
    from turbollm import LLM
    llm = LLM(kv_cache_memory="64MiB", max_model_len=256)
    system = llm.engine.executor.worker.system
    assert lines["prefill_dtype"] == system["prefill_dtype"]
    assert lines["lowbit_multi_row"] == system["lowbit_multi_row"]
    from turbollm.quantization import native
    if native.amx() is not None and lines["prefill_dtype"] == "bfloat16":
        assert lines["lowbit_multi_row"].startswith("amx tiles")
    elif native.lanes() is not None and lines["prefill_dtype"] == "bfloat16":
        assert lines["lowbit_multi_row"].startswith("lanes")  # an AVX-512 CPU without AMX
