"""Prefill-sized products: fp32, or bf16 (oneDNN) where the worker chooses it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from turbollm.config import EngineConfig
from turbollm.layers import prefill_gemm
from turbollm.native_build import supported_isas
from turbollm.platform_info import cpu_has_native_bf16
from turbollm.worker.worker import Worker


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_both_precisions_against_torch(monkeypatch, wdtype):
    x, w = torch.randn(200, 96), torch.randn(64, 96).to(wdtype)
    monkeypatch.setattr(prefill_gemm, "_bf16", False)
    assert torch.equal(prefill_gemm.prefill_gemm(x, w), F.linear(x, w.float()))
    monkeypatch.setattr(prefill_gemm, "_bf16", True)
    y = prefill_gemm.prefill_gemm(x, w)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.bfloat16(), w.bfloat16()).float())
    ref = F.linear(x, w.float())
    # bf16 keeps 8 mantissa bits: a relative error of a few 2^-8 over a 96-term sum
    assert (y - ref).norm() / ref.norm() < 2 ** -6


def _worker_facts(isa, dtype="auto", prefill="auto", compute=torch.float32,
                  storage=torch.bfloat16):
    config = EngineConfig.from_kwargs(dtype=dtype, prefill_dtype=prefill)
    model = SimpleNamespace(model=SimpleNamespace(compute_dtype=compute))
    return SimpleNamespace(config=config, cpu_isa=isa, model=model,
                           loaded=SimpleNamespace(dtype=storage))


def test_the_worker_chooses_bf16_on_cpus_with_bf16_instructions_and_dtype_auto(monkeypatch):
    monkeypatch.setattr("turbollm.platform_info.cpu_has_native_bf16", lambda: True)
    choose = Worker._prefill_in_bf16
    assert choose(_worker_facts("amx"))
    assert choose(_worker_facts("avx512"))  # AVX-512 BF16 without AMX (Zen 4): oneDNN's bf16
    assert choose(_worker_facts("avx2"))  # e.g. Cooper Lake (BF16 without VBMI2), or forced
    assert not choose(_worker_facts(None))  # no C kernel variant (not x86)
    assert not choose(_worker_facts("amx", dtype="float32"))  # fp32 asked for: kept
    assert not choose(_worker_facts("amx", compute=torch.bfloat16))
    assert not choose(_worker_facts("amx", storage=torch.float32))  # an fp32 checkpoint
    assert not choose(_worker_facts("amx", prefill="float32"))
    monkeypatch.setattr("turbollm.platform_info.cpu_has_native_bf16", lambda: False)
    assert not choose(_worker_facts("amx"))
    assert not choose(_worker_facts("avx512"))
    assert choose(_worker_facts("avx2", prefill="bfloat16"))  # asked for: granted


@pytest.mark.skipif(not cpu_has_native_bf16() or not supported_isas(),
                    reason="needs bf16 instructions (AMX or AVX-512 BF16) and an x86 kernel variant")
def test_a_default_prefill_runs_bf16_products_where_the_cpu_has_bf16(monkeypatch):
    """The bundled Q4_1 model in the default configuration: its prompt's products are bf16."""
    from turbollm import LLM, SamplingParams
    seen = []
    linear = F.linear

    def spy(x, w, *args):
        seen.append((x.shape[0], x.dtype))
        return linear(x, w, *args)
    llm = LLM(kv_cache_memory="16MiB", max_model_len=512)
    assert llm.engine.system["prefill_dtype"] == "bfloat16"
    monkeypatch.setattr(prefill_gemm.F, "linear", spy)
    llm.generate([list(range(10, 310))], SamplingParams(max_tokens=2), use_tqdm=False)
    assert (300, torch.bfloat16) in seen
