"""The C decode path (models/native_decode.py) against the module path it shortcuts."""
import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.attention.backend import AttentionMetadata
from turbollm.layers import native_ops
from turbollm.models import native_decode
from turbollm.models.native_decode import NativeDecoder, attention_rows

pytestmark = pytest.mark.skipif(native_ops.lib() is None,
                                reason="needs the C kernels (x86 with AVX2 and a C compiler)")

# No prefix caching: the second run would attend its cached prompt blocks from a shorter
# uncached chunk, which rounds differently from the first run's whole-prompt prefill.
ENGINE = dict(max_num_seqs=8, enable_prefix_caching=False)
PROMPTS = [[5, 17, 300, 4001, 23, 23, 99], [7, 8, 9], list(range(100, 140)), [42] * 12]


def _run(llm: LLM, native: bool, **params):
    llm.engine.executor.worker.set_native_decode(native)
    try:
        sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3,
                            **params)
        return llm.generate(PROMPTS, sp, use_tqdm=False)
    finally:
        llm.engine.executor.worker.set_native_decode(True)


def _count_native_steps(monkeypatch) -> list[int]:
    taken = []
    forward = NativeDecoder.forward

    def spy(self, input_ids, *args):
        out = forward(self, input_ids, *args)
        if out is not None:
            taken.append(input_ids.shape[0])
        return out
    monkeypatch.setattr(NativeDecoder, "forward", spy)
    return taken


@pytest.mark.parametrize("kind,quantization", [("llama", None), ("qwen2", None),
                                               ("mistral_window", None), ("llama", "int4"),
                                               ("llama", "int8"), ("llama", "fp8")])
def test_same_tokens_and_logprobs_as_the_module_path(tiny_model_factory, monkeypatch, kind,
                                                     quantization):
    llm = LLM(str(tiny_model_factory(kind)), dtype="float32", quantization=quantization,
              quantization_group_size=32, **ENGINE)
    taken = _count_native_steps(monkeypatch)
    fast = _run(llm, native=True)
    assert len(PROMPTS) in taken  # the batched decode steps went through C
    assert sum(map(len, PROMPTS)) in taken  # and so did the prompts (62 rows, one chunk each)
    n_native = len(taken)
    slow = _run(llm, native=False)
    assert len(taken) == n_native  # switched off: no step took it
    for a, b in zip(fast, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # same kernels, same order of sums: bit-identical logprobs (dataclass equality)
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


@pytest.mark.parametrize("kind,quantization,c_loop", [
    ("llama", None, True), ("llama", "int4", True), ("llama", "int8", True),
    ("llama", "fp8", True), ("mistral_window", None, True), ("qwen2", None, False)])  # qwen2: a qkv bias
def test_layer_loop_in_c_matches_the_python_loop(tiny_model_factory, monkeypatch, kind,
                                                 quantization, c_loop):
    llm = LLM(str(tiny_model_factory(kind)), dtype="float32", quantization=quantization,
              quantization_group_size=32, **ENGINE)
    plans = []
    build = NativeDecoder._build_plan
    monkeypatch.setattr(NativeDecoder, "_build_plan",
                        lambda self, *a: plans.append(build(self, *a)) or plans[-1])
    in_c = _run(llm, native=True)
    assert plans and all((p is not None) == c_loop for p in plans)
    native_decode.enable_c_loop(False)
    try:
        in_python = _run(llm, native=True)
    finally:
        native_decode.enable_c_loop(True)
    for a, b in zip(in_c, in_python):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "int8", "fp8_e4m3"])
def test_quantized_and_16_bit_kv_caches_take_the_c_path(tiny_llama, monkeypatch, kv_cache_dtype):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_dtype=kv_cache_dtype, **ENGINE)
    taken = _count_native_steps(monkeypatch)
    fast = _run(llm, native=True)
    assert len(PROMPTS) in taken and sum(map(len, PROMPTS)) in taken
    slow = _run(llm, native=False)
    for a, b in zip(fast, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def _fp32_math_over(model, dtype: str, monkeypatch) -> LLM:
    """An engine storing `dtype` and computing in fp32 (the C path) on any CPU: a CPU with bf16
    instructions would compute an explicit bfloat16 in bf16, so its probe is patched."""
    monkeypatch.setattr("turbollm.platform_info.cpu_has_native_bf16", lambda: False)
    llm = LLM(str(model), dtype=dtype, **ENGINE)
    assert llm.engine.executor.worker.model.model.compute_dtype == torch.float32
    return llm


def test_bf16_storage_matches_the_module_path(tiny_llama, monkeypatch):
    llm = _fp32_math_over(tiny_llama, "bfloat16", monkeypatch)
    taken = _count_native_steps(monkeypatch)
    fast = _run(llm, native=True)
    assert taken  # the C path served
    slow = _run(llm, native=False)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in slow]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_16_bit_embedding_tables_are_read_by_c(tiny_llama, monkeypatch, dtype):
    """decode_layers gathers fp16/bf16 (and fp32) embedding rows itself; a table type it does
    not read is gathered by torch first. Both give the module path's tokens."""
    llm = _fp32_math_over(tiny_llama, dtype, monkeypatch)
    taken = _count_native_steps(monkeypatch)
    in_c = _run(llm, native=True)
    assert taken
    monkeypatch.setattr(native_decode, "_EMBED_KINDS", {})
    by_torch = _run(llm, native=True)
    slow = _run(llm, native=False)
    for a, b, c in zip(in_c, by_torch, slow):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_speculative_verification_rows_match_the_module_path(tiny_llama, monkeypatch):
    # n-gram proposals on repetitive prompts: verification chunks of a few rows over a cache
    llm = LLM(str(tiny_llama), dtype="float32", speculative_method="ngram",
              num_speculative_tokens=4, **ENGINE)
    taken = _count_native_steps(monkeypatch)
    fast = _run(llm, native=True)
    assert any(t > len(PROMPTS) for t in taken)  # some step verified proposals natively
    slow = _run(llm, native=False)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in slow]


def test_self_draft_steps_take_the_c_path_on_its_first_layers(tiny_llama, monkeypatch):
    """A --draft-layers draft runs the target's first layers through the same C path, and
    proposes what the module path proposes (so outputs and acceptance are unchanged)."""
    def spec_llm():
        llm = LLM(str(tiny_llama), dtype="float32", speculative_method="draft", draft_layers=1,
                  num_speculative_tokens=3, verify_cost="0.01", **ENGINE)
        llm.engine.spec.controller.proposal_cost = 0.0  # propose every step
        return llm
    layers_run = []
    forward = NativeDecoder.forward

    def spy(self, input_ids, positions, kv_caches, meta, *rest):
        out = forward(self, input_ids, positions, kv_caches, meta, *rest)
        if out is not None:
            layers_run.append(len(kv_caches))
        return out
    monkeypatch.setattr(NativeDecoder, "forward", spy)
    fast_llm, slow_llm = spec_llm(), spec_llm()
    fast = _run(fast_llm, native=True)
    n_layers = len(fast_llm.engine.executor.worker.model.model.layers)
    assert 1 in layers_run and n_layers in layers_run  # draft and target steps both in C
    slow = _run(slow_llm, native=False)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in slow]
    a, b = fast_llm.engine.spec, slow_llm.engine.spec
    assert a.num_draft_tokens > 0
    assert (a.num_draft_tokens, a.num_accepted_tokens) == (b.num_draft_tokens,
                                                           b.num_accepted_tokens)


def test_attention_rows_cover_decodes_then_verification_chunks():
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(5, dtype=torch.long), num_decodes=2,
        decode_block_tables=torch.tensor([[3, 0], [4, 5]]), decode_seq_lens=torch.tensor([7, 20]),
        prefills=[(2, 3, 33, torch.tensor([6, 7, 8]))], block_size=16)
    tables, seq, ctx = attention_rows(meta, 5)
    assert tables.tolist() == [[3, 0, 0], [4, 5, 0], [6, 7, 8]]
    assert seq.tolist() == [0, 1, 2, 2, 2]
    assert ctx.tolist() == [7, 20, 31, 32, 33]  # each verified token sees itself and before


def test_only_short_prompt_chunks_are_decode_shaped():
    from turbollm.attention.native import MAX_ROW_CHUNK

    def meta(qlen):
        return AttentionMetadata(
            slot_mapping=torch.zeros(qlen, dtype=torch.long), num_decodes=0,
            decode_block_tables=None, decode_seq_lens=None,
            prefills=[(0, qlen, qlen, torch.tensor([1] * (-(-qlen // 16))))], block_size=16)
    tables, seq, ctx = attention_rows(meta(3), 3)
    assert seq.tolist() == [0, 0, 0] and ctx.tolist() == [1, 2, 3]  # row j sees j + 1 tokens
    assert attention_rows(meta(MAX_ROW_CHUNK), MAX_ROW_CHUNK) is not None
    assert attention_rows(meta(MAX_ROW_CHUNK + 1), MAX_ROW_CHUNK + 1) is None


def test_ab_benchmark_times_both_paths(tiny_llama):
    from turbollm.bench.native_decode import step_times
    llm = LLM(str(tiny_llama), dtype="float32", **ENGINE)
    llm.engine.add_request("ab", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    llm.engine.step()
    times = step_times(llm.engine, rounds=2, steps=3)
    assert [len(times[True]), len(times[False])] == [2, 2]
    assert all(t > 0 for t in times[True] + times[False])
    assert llm.engine.executor.worker.model.model.native_decode  # switched back afterwards


@pytest.mark.parametrize("quantization", [None, "int4", "int8"])
def test_bound_head_kernel_matches_the_module_call(tiny_llama, quantization):
    llm = LLM(str(tiny_llama), dtype="float32", quantization=quantization,
              quantization_group_size=32, **ENGINE)
    model = llm.engine.executor.worker.model
    for rows in (1, 3, 1):  # the second call with one row reuses the bound kernel
        hidden = torch.randn(rows, model.lm_head.in_features)
        got = model.compute_logits(hidden)
        assert torch.equal(got, model.lm_head(hidden).float())
    assert any(entry[2] is not None for entry in model._head_kernels.values())


def test_bound_head_kernel_follows_a_new_weight(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", **ENGINE)
    model = llm.engine.executor.worker.model
    hidden = torch.randn(2, model.lm_head.in_features)
    model.compute_logits(hidden)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight),
                                              requires_grad=False)
    assert torch.equal(model.compute_logits(hidden), model.lm_head(hidden).float())
