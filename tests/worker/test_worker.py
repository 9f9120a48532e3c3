"""The Worker and its executor: the life the engine drives (info, KV sizing, cache, steps),
a hand-off that crosses a process boundary (pickled both ways), and KernelConfig reaching the
kernels it switches."""
from __future__ import annotations

import logging
import pickle

import pytest

from turbollm import LLM, SamplingParams
from turbollm.cli_args import add_engine_args, engine_kwargs
from turbollm.config import EngineConfig, KernelConfig
from turbollm.core.batch import DraftWork, StepBatch, sequence_work
from turbollm.core.request import Request
from turbollm.executor.uniproc import UniProcExecutor
from turbollm.models.native_decode import NativeDecoder
from turbollm.quantization import kernels
from turbollm.sizing import kv_cache_bytes_per_token
from turbollm.worker.worker import Worker


def test_worker_life_as_the_engine_drives_it(tiny_llama):
    config = EngineConfig.from_kwargs(model=str(tiny_llama), dtype="float32",
                                      kv_cache_memory="1MiB", block_size=16)
    worker = Worker(config)
    info = worker.model_info()
    assert (info.device, info.dtype, info.eos_token_ids) == ("cpu", "float32", [2])
    blocks = worker.num_kv_blocks()
    assert blocks == 2**20 // (16 * kv_cache_bytes_per_token(info.arch, "float32"))
    worker.init_cache(blocks)
    assert worker.kv_cache.shape[2] == blocks
    assert worker.max_model_len == min(info.max_model_len, blocks * 16) == 512
    req = Request("r", [5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0), [], 2)
    out = worker.execute(StepBatch([sequence_work(req, 4, [0])]))
    assert len(out.sampled_token_ids) == 1 and len(out.sampled_token_ids[0]) == 1


def test_a_partial_prefill_chunk_samples_nothing(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB")
    req = Request("r", list(range(10, 30)), SamplingParams(max_tokens=2), [], 2)
    out = llm.engine.executor.execute(StepBatch([sequence_work(req, 8, [0, 1])]))
    assert out.sampled_token_ids == [[]]


class PicklingExecutor(UniProcExecutor):
    """Every batch and result goes through pickle, as it would to a worker process."""

    def execute(self, batch):
        return pickle.loads(pickle.dumps(super().execute(pickle.loads(pickle.dumps(batch)))))

    def propose(self, work):
        return pickle.loads(pickle.dumps(super().propose(pickle.loads(pickle.dumps(work)))))


@pytest.mark.parametrize("spec", [{}, {"speculative_method": "draft", "draft_layers": 1,
                                       "num_speculative_tokens": 2, "verify_cost": "0.1"}])
def test_the_hand_off_crosses_a_process_boundary(tiny_llama, monkeypatch, spec):
    """Greedy and seeded outputs are the same when every hand-off is pickled."""
    kw = dict(dtype="float32", kv_cache_memory="2MiB", **spec)
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True,
                             logprobs=2)]
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    plain = LLM(str(tiny_llama), **kw).generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr("turbollm.engine.llm_engine.make_executor", PicklingExecutor)
    llm = LLM(str(tiny_llama), **kw)
    assert isinstance(llm.engine.executor, PicklingExecutor)
    crossed = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in crossed] == [o.outputs[0].token_ids for o in plain]


def test_draft_work_is_plain_and_the_worker_keeps_no_draft_state(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB",
              speculative_method="draft", draft_layers=1, verify_cost="0.1")
    engine = llm.engine
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # prefill: the prompt's KV is in the cache
    req = engine.scheduler.running[0]
    work = DraftWork(req.request_id, list(req.all_token_ids),
                     engine.kv_manager.block_ids(req.request_id), 2, req.draft_num_computed)
    first = engine.executor.propose([work])
    assert len(first[0]) == 2 and engine.executor.propose([work]) == first


def _native_steps(monkeypatch) -> list[int]:
    taken = []
    forward = NativeDecoder.forward

    def spy(self, input_ids, *args):
        out = forward(self, input_ids, *args)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(NativeDecoder, "forward", spy)
    return taken


@pytest.mark.parametrize("native", [True, False])
def test_native_decode_is_configuration(tiny_llama, monkeypatch, native):
    from turbollm.layers import native_ops
    if native and native_ops.lib() is None:
        pytest.skip("needs the C kernels (x86 with AVX2 and a C compiler)")
    taken = _native_steps(monkeypatch)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB", native_decode=native)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert any(taken) if native else not taken


def test_exact_activations_is_configuration(tiny_llama, monkeypatch):
    monkeypatch.setattr(kernels, "_int16_activations", True)
    LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB", exact_activations=True)
    assert kernels.dispatch_key()[0] is False
    LLM(str(tiny_llama), dtype="float32", kv_cache_memory="1MiB")
    assert kernels.dispatch_key()[0] is True


def test_old_environment_switches_are_deprecated_aliases(monkeypatch, caplog):
    monkeypatch.setenv("TURBOLLM_NATIVE_DECODE", "0")
    monkeypatch.setenv("TURBOLLM_EXACT_ACTIVATIONS", "1")
    with caplog.at_level(logging.WARNING, logger="turbollm.config"):
        kc = KernelConfig()
    assert (kc.native_decode, kc.exact_activations) == (False, True)
    assert "TURBOLLM_NATIVE_DECODE is deprecated" in caplog.text
    assert KernelConfig(native_decode=True).native_decode  # an explicit choice wins
    monkeypatch.delenv("TURBOLLM_NATIVE_DECODE")
    monkeypatch.delenv("TURBOLLM_EXACT_ACTIVATIONS")
    assert KernelConfig() == KernelConfig(native_decode=True, exact_activations=False)


def test_kernel_flags_on_the_command_line(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    add_engine_args(p)
    tiles = tmp_path / "tiles.json"
    tiles.write_text("{}")
    kw = engine_kwargs(p.parse_args(["--no-native-decode", "--exact-activations",
                                     "--tile-config", str(tiles)]))
    assert EngineConfig.from_kwargs(**kw).kernel == KernelConfig(
        native_decode=False, exact_activations=True, tile_config=str(tiles))
    with pytest.raises(ValueError, match="tile_config"):
        KernelConfig(tile_config=str(tmp_path / "missing.json"))


def test_a_kv_budget_over_free_memory_is_an_error_naming_the_flag(tiny_llama, monkeypatch):
    from turbollm import platform_info
    free = platform_info.available_memory_bytes()
    assert free is None or free > 0  # read from /proc/meminfo here
    monkeypatch.setattr(platform_info, "available_memory_bytes", lambda: 8 * 2**20)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory="64MiB")
    LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB")  # within: fine
