"""Our Llama-family model against Hugging Face transformers, fp32, on tiny random configs."""
import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.core.request import Request
from turbollm.core.batch import sequence_work

KINDS = ["llama", "llama3", "mistral", "mistral_window", "qwen2"]


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def our_logits(llm: LLM, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every position, computing the sequence in the given chunk sizes (paged cache)."""
    engine = llm.engine
    req = Request("probe", token_ids, SamplingParams(max_tokens=1), [], 1)
    rows = []
    for n in chunks:
        assert engine.kv_manager.allocate_slots(req, n)
        work = sequence_work(req, n, engine.kv_manager.block_ids("probe"))
        worker = engine.executor.worker
        batch = worker.runner.build_batch([work])
        with torch.inference_mode():
            h = worker.model(batch.input_ids, batch.positions, worker.runner.kv_views, batch.meta)
            rows.append(worker.model.compute_logits(h))
        req.num_computed_tokens += n
    engine.kv_manager.free(req)
    return torch.cat(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tiny_model_factory):
    path = tiny_model_factory(kind)
    ref = hf_model(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (40,), generator=g).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB", block_size=4)
    # All at once, in prefill chunks that cross block borders, and token by token (decode path).
    for chunks in ([40], [13, 11, 16], [5] + [1] * 35):
        got = our_logits(llm, ids, chunks)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_generation_matches_transformers(kind, tiny_model_factory):
    path = tiny_model_factory(kind)
    ref = hf_model(path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory="8MiB", block_size=4)
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time, in a land"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        assert out.outputs[0].token_ids == gen[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("path", ["bf16_math", "fp32_math_over_bf16"])
def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(tiny_model_factory, monkeypatch,
                                                           path):
    """dtype=bfloat16 on both sides, against both in fp32.

    The tolerance comes from the reference, not from a constant: bf16 keeps 8 significant bits
    (a relative rounding of up to 2^-9 per value), so two correct bf16 forwards differ by where
    they round, and a fixed bound would either hide a bug or fail on a CPU that rounds in
    another order. So our bf16 logits must be no further from the fp32 logits than transformers'
    own bf16 forward is (with a margin of 2x for a different rounding order), and agree with it
    on the top token at least as often as that forward agrees with fp32, less one position in
    ten. Both compute paths run on every CPU: bf16 math (the probe says the CPU has it; torch
    runs it anyway, just slower, where it has not) and fp32 math over bf16 storage (the C path).
    """
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model_factory("llama")
    monkeypatch.setattr("turbollm.platform_info.cpu_has_native_bf16",
                        lambda: path == "bf16_math")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 49152, (32,), generator=g).tolist()
    with torch.no_grad():
        ref32 = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
        hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                    attn_implementation="eager").eval()
        hf16 = hf16(torch.tensor([ids])).logits[0].float()
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory="8MiB", block_size=4)
    math = llm.engine.executor.worker.model.model.compute_dtype
    assert math == (torch.bfloat16 if path == "bf16_math" else torch.float32)
    ours = our_logits(llm, ids, [20] + [1] * 12)  # a prefill chunk, then decode steps
    hf_err = (hf16 - ref32).abs().max()
    assert 0 < hf_err < 0.1 * ref32.abs().max()  # the reference itself is a sane bf16 forward
    assert (ours - ref32).abs().max() <= 2 * hf_err
    agree_hf = (hf16.argmax(-1) == ref32.argmax(-1)).float().mean()
    agree_ours = (ours.argmax(-1) == ref32.argmax(-1)).float().mean()
    assert agree_ours >= agree_hf - 0.1


def test_parameter_count_matches_arch(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="8MiB")
    n = sum(p.numel() for p in llm.engine.executor.worker.model.parameters())  # tied: counted once
    assert n == llm.engine.arch.num_parameters()
    assert n == sum(p.numel() for p in hf_model(path).parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the same code is tested on CPU above")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers_on_cuda(kind, tiny_model_factory):
    path = tiny_model_factory(kind)
    ref = hf_model(path)
    ids = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    llm = LLM(str(path), dtype="float32", device="cuda", kv_cache_memory="8MiB", block_size=4)
    for chunks in ([40], [5] + [1] * 35):
        got = our_logits(llm, ids, chunks).cpu()
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
