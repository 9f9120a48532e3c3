"""Adapters through the engine on the tiny random Llama: speculative decoding, the rank cap,
CUDA."""
from __future__ import annotations

import pytest
import torch

from turbollm import LLM, LoRARequest, SamplingParams
from turbollm.engine.errors import RequestValidationError

PROMPTS = ["one two three one two three one two", "the cat sat on the mat and the cat"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _texts(llm, lora):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, lora_request=lora)]


@pytest.fixture(scope="module")
def plain(tiny_llama, good_adapter):
    """Greedy tokens without speculation: (base, adapter)."""
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", enable_lora=True)
    lora = LoRARequest("good", 1, str(good_adapter))
    return _texts(llm, None), _texts(llm, lora)


@pytest.mark.parametrize("spec", [dict(speculative_method="ngram"),
                                  dict(speculative_method="draft", draft_layers=1)])
def test_speculative_decoding_keeps_the_adapters_output(spec, tiny_llama, good_adapter, plain):
    """Proposals come from n-grams or the base model's first layer; verification runs the
    adapter, so greedy output is the adapter's own."""
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", enable_lora=True,
              num_speculative_tokens=3, verify_cost="0.2", **spec)
    lora = LoRARequest("good", 1, str(good_adapter))
    assert plain[0] != plain[1]
    assert _texts(llm, lora) == plain[1]
    assert _texts(llm, None) == plain[0]
    assert llm.engine.spec.num_spec_steps > 0  # speculation did run


def test_rank_above_max_lora_rank_is_refused(tiny_llama, good_adapter):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", enable_lora=True,
              max_lora_rank=2)
    with pytest.raises(RequestValidationError, match="rank 4 is above max_lora_rank 2"):
        llm.generate(["hi"], GREEDY, lora_request=LoRARequest("good", 1, str(good_adapter)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapters_on_cuda_match_cpu(tiny_llama, good_adapter, plain):
    llm = LLM(str(tiny_llama), dtype="float32", device="cuda", kv_cache_memory="8MiB",
              enable_lora=True)
    assert _texts(llm, [LoRARequest("good", 1, str(good_adapter)), None]) == \
        [plain[1][0], plain[0][1]]


def test_a_seeded_request_with_an_adapter_keeps_its_text_in_a_large_batch(tiny_llama,
                                                                         good_adapter):
    """Batch invariance covers adapter rows: in a step of more rows than the C LoRA kernel
    takes by default (MAX_C_ROWS), a seeded request's adapter term is still computed as if
    alone, so its sampled text is the one it gets alone."""
    from turbollm.layers import lora as lora_layer
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB", enable_lora=True,
              max_num_seqs=128)
    lora = LoRARequest("good", 1, str(good_adapter))
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=4242, ignore_eos=True,
                            logprobs=0)  # (the sampled tokens' logprobs: the bits, not a tie)
    alone = llm.generate([PROMPTS[0]], seeded, lora_request=lora)[0].outputs[0]
    n = lora_layer.MAX_C_ROWS + 16
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=i, ignore_eos=True) if i % 2
              else SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
              for i in range(n)] + [seeded]
    prompts = [f"{PROMPTS[i % 2]} {i}" for i in range(n)] + [PROMPTS[0]]
    loras = [lora if i % 3 else None for i in range(n)] + [lora]
    worker = llm.engine.executor.worker
    rows, execute = [], worker.runner.execute
    worker.runner.execute = lambda batch: (rows.append(len(batch.sequences)), execute(batch))[1]
    outs = llm.generate(prompts, params, lora_request=loras)
    assert max(rows) > lora_layer.MAX_C_ROWS  # the decode steps had that many rows
    got = outs[-1].outputs[0]
    assert got.token_ids == alone.token_ids
    assert [p.sampled for p in got.logprobs] == [p.sampled for p in alone.logprobs]
