"""Speculative decoding in the engine: greedy output equals plain decoding (alone, in a mixed
batch, under preemption) for n-gram and draft proposers; exact sampling distribution; exact
block accounting."""
import pytest
import torch
from chi2 import chi2_critical, chi2_statistic

from turbollm import LLM, SamplingParams
from turbollm.corpus import builtin_corpus_text
from turbollm.quantization import native as quant_native

COMMON = dict(dtype="float32", num_threads=2, quantization="none")
SPEC_KINDS = {
    "ngram": dict(speculative_method="ngram", num_speculative_tokens=6),
    "self_draft": dict(speculative_method="draft", draft_layers=20, num_speculative_tokens=3),
    "draft_model": dict(speculative_method="draft", draft_model="smollm2-135m",
                        num_speculative_tokens=3),
}


@pytest.fixture(scope="module")
def plain():
    return LLM("smollm2-135m", kv_cache_memory="64MiB", **COMMON)


@pytest.fixture(scope="module")
def prompts(plain):
    text = builtin_corpus_text(20000)
    asks = [("Repeat this text word for word:\n\n", 400), ("Summarize:\n\n", 500),
            ("Write a poem about the sea.", 0), ("List three prime numbers.", 0)]
    out = []
    for i in range(16):
        ask, chars = asks[i % len(asks)]
        body = text[i * 900: i * 900 + chars] if chars else ""
        out.append(plain.apply_chat_template([{"role": "user", "content": ask + body}]))
    return out


def spec_llm(kind, **kw):
    kw = {"kv_cache_memory": "64MiB", **COMMON, **kw}
    # The separate draft is the same model: every proposal is accepted, so the controller must
    # be made to use it (its cost estimate says a draft as slow as the target never pays).
    if kind == "draft_model":
        kw = {"verify_cost": "0.01", **kw}
    llm = LLM("smollm2-135m", **SPEC_KINDS[kind], **kw)
    if kind == "draft_model":
        llm.engine.spec.controller.proposal_cost = 0.0
    return llm


def greedy(n=24):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind", list(SPEC_KINDS))
def test_greedy_alone_equals_plain(plain, prompts, kind):
    llm = spec_llm(kind)
    for p in prompts[:2]:
        assert tokens(llm.generate([p], greedy())) == tokens(plain.generate([p], greedy()))
    spec = llm.engine.spec
    assert spec.num_spec_steps > 0 and spec.num_draft_tokens > 0
    llm.engine.kv_manager.check_invariant()
    assert llm.engine.kv_manager.pool.num_used == 0


@pytest.mark.skipif(quant_native.lib() is None,
                    reason="needs the AVX2 low-bit kernels (torch's fallbacks sum differently "
                           "per row count); the fp32 equality above covers the logic")
@pytest.mark.parametrize("kind", ["ngram", "self_draft"])
def test_greedy_equals_plain_on_native_q4_1_weights(prompts, kind):
    """The engine's defaults (the GGUF's Q4_1/Q8_0 weights served natively, int16 activations,
    bf16 KV, the C decode path): a verification of k + 1 rows computes each row with the same
    bits as a one-row decode step (same kernels, same summation order at any row count), so
    greedy speculation reproduces plain decoding exactly here too, not only in fp32."""
    kw = dict(num_threads=2, kv_cache_memory="64MiB", enable_prefix_caching=False)
    base = LLM("smollm2-135m", **kw)
    llm = LLM("smollm2-135m", **SPEC_KINDS[kind], **kw)
    for p in prompts[:2]:
        assert tokens(llm.generate([p], greedy(40))) == tokens(base.generate([p], greedy(40)))
    assert llm.engine.spec.num_spec_steps > 0


@pytest.mark.parametrize("kind", ["ngram", "self_draft"])
def test_batch_of_16_mixed_equals_plain(plain, prompts, kind):
    """Greedy and seeded sampling requests side by side: the greedy ones match plain decoding
    and the seeded ones are reproducible."""
    llm = spec_llm(kind)
    params = [greedy(16 + i) if i % 2 == 0 else
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i)
              for i in range(16)]
    got = llm.generate(prompts, params)
    ref = plain.generate([p for i, p in enumerate(prompts) if i % 2 == 0],
                         [q for i, q in enumerate(params) if i % 2 == 0])
    assert tokens(got[0::2]) == tokens(ref)
    again = llm.generate(prompts[1::2], params[1::2])
    assert tokens(again) == tokens(got[1::2])
    assert llm.engine.spec.num_spec_steps > 0
    llm.engine.kv_manager.check_invariant()
    assert llm.engine.kv_manager.pool.num_used == 0


@pytest.mark.parametrize("kind", ["ngram", "draft_model"])
def test_greedy_under_preemption_equals_plain(plain, prompts, kind):
    # Room for about two and a half of these sequences at once (fp32 KV: 46 KB per token, and a
    # separate draft's cache takes half the budget): the rest wait or are preempted.
    budget = "40MiB" if kind == "draft_model" else "20MiB"
    llm = spec_llm(kind, kv_cache_memory=budget, max_num_seqs=16, block_size=16)
    got = llm.generate(prompts[:6], greedy(20))
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(got) == tokens(plain.generate(prompts[:6], greedy(20)))
    llm.engine.kv_manager.check_invariant()
    assert llm.engine.kv_manager.pool.num_used == 0


def test_stop_inside_accepted_tokens_cuts_output(plain, prompts):
    """A stop string met in the middle of a speculative step ends the output exactly where
    plain decoding ends it."""
    ref = plain.generate([prompts[0]], greedy(40))[0].outputs[0]
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 6]
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=[stop])
    llm = spec_llm("ngram")
    a = llm.generate([prompts[0]], params)[0].outputs[0]
    b = plain.generate([prompts[0]], params)[0].outputs[0]
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)


def test_logprobs_with_speculation_match_plain(plain, prompts):
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2, ignore_eos=True)
    a = spec_llm("ngram").generate([prompts[0]], params)[0].outputs[0]
    b = plain.generate([prompts[0]], params)[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.logprobs) == len(b.logprobs) == 16
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.sampled.token_id == y.sampled.token_id
        assert abs(x.sampled.logprob - y.sampled.logprob) < 1e-3


def test_bad_draft_configuration_is_refused():
    with pytest.raises(ValueError, match="draft-model or --draft-layers"):
        LLM("smollm2-135m", speculative_method="draft", **COMMON)
    with pytest.raises(ValueError, match="draft_layers"):
        LLM("smollm2-135m", speculative_method="draft", draft_layers=30, **COMMON)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, bundled_tokenizer):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=12, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("small_vocab")
    model.save_pretrained(path, safe_serialization=True)
    bundled_tokenizer.save_pretrained(path)
    return path


def test_sampled_distribution_matches_target_exactly(small_vocab_model):
    """2000 seeded samples of the 2nd generated token, produced by a speculative step (the
    first token's n-gram continuation verified with the accept/resample rule), against the
    exact marginal sum_t1 p(t1) p(t2 | t1) computed from the model's logits."""
    llm = LLM(str(small_vocab_model), dtype="float32", num_threads=2, max_num_seqs=256,
              speculative_method="ngram", num_speculative_tokens=2)
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 5, 9, 4]  # every token has a continuation
    V = 12
    p1 = torch.softmax(llm.score_logits(prompt)[-1], -1)
    p2 = sum(p1[t] * torch.softmax(llm.score_logits(prompt + [t])[-1], -1) for t in range(V))
    n = 2000
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + i, ignore_eos=True,
                             detokenize=False) for i in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    spec = llm.engine.spec
    assert spec.num_spec_steps >= n  # every request verified a proposal for its 2nd token
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    counts = [0] * V
    for o in outs:
        counts[o.outputs[0].token_ids[1]] += 1
    stat, df = chi2_statistic(counts, p2.tolist())
    assert stat < chi2_critical(df), (counts, [round(float(x) * n) for x in p2])
    llm.engine.kv_manager.check_invariant()
    assert llm.engine.kv_manager.pool.num_used == 0
