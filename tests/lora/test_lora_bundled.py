"""LoRA adapters on the bundled SmolLM2-135M: logits against PEFT's merged model in HF
transformers (fp32), mixed batches, quantized bases, prefix-cache isolation, slot and memory
limits. Adapters are made here with `peft` (random, non-zero A and B)."""
from __future__ import annotations

import pytest
import torch

from lora_helpers import hf_logits, make_adapter, our_logits
from turbollm import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.slow

# name -> (rank, target modules, lora_alpha, rsLoRA)
SPECS = {
    "r8_qv": (8, ["q_proj", "v_proj"], 16, False),
    "r16_all": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"], 32, False),
    "r64_mlp_rs": (64, ["o_proj", "gate_proj", "up_proj", "down_proj"], 8, True),
}
PROMPT_LEN = 24


@pytest.fixture(scope="module")
def probe_ids(bundled_tokenizer):
    ids = bundled_tokenizer("The history of the Roman empire begins with a small town on the "
                            "river Tiber, where farmers and traders met to sell grain and wine").input_ids
    assert len(ids) >= PROMPT_LEN
    return ids[:PROMPT_LEN]


@pytest.fixture(scope="module")
def references(bundled_gguf, tmp_path_factory, probe_ids):
    """name -> (LoRARequest, HF logits of probe_ids under the merged adapter); 'base' -> HF
    logits of the base model."""
    from turbollm.bench.peers import hf_model_from_gguf
    hf = hf_model_from_gguf(bundled_gguf, torch.float32)
    out = {"base": (None, hf_logits(hf, probe_ids))}
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets, alpha, rs)) in enumerate(SPECS.items()):
        merged = make_adapter(hf, root / name, r, targets, alpha, rs, seed=i, scale=1.5)
        out[name] = (LoRARequest(name, i + 1, str(root / name)), hf_logits(merged, probe_ids))
        del merged
    return out


@pytest.fixture(scope="module")
def ours():
    return LLM("smollm2-135m", dtype="float32", quantization="none", kv_cache_memory="64MiB",
               max_model_len=1024, enable_lora=True, max_loras=4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_match_peft_merged_model(name, ours, references, probe_ids):
    lora, expected = references[name]
    base = references["base"][1]
    assert (expected - base).abs().max() > 1.0  # the adapter changes the model visibly
    # whole prompt, and chunks crossing blocks (one-token steps: the next test)
    for chunks in ([PROMPT_LEN], [13, 11]):
        got = our_logits(ours, probe_ids, chunks, lora)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(our_logits(ours, probe_ids, [PROMPT_LEN]), base,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("path", ["c_loop", "python_loop", "modules"])
def test_decode_steps_on_every_path(path, ours, references, probe_ids, monkeypatch):
    """Decode-shaped steps with an adapter give PEFT's logits whichever path runs them: the
    one-call C loop (decode_layers adds the LoRA terms), the native decoder's Python loop (C
    kernels, LinearLoRA.add_rows after each), the torch modules. Checks which one ran."""
    from turbollm.layers.lora import LinearLoRA
    from turbollm.models import native_decode
    ran = {"native": 0, "c_loop": 0, "add_rows": 0}
    forward, decode_layers = native_decode.NativeDecoder.forward, None
    add_rows = LinearLoRA.add_rows

    def spy_forward(self, *args):
        nonlocal decode_layers
        lib = self.lib
        if decode_layers is None:  # count decode_layers calls through a wrapper object
            class Counting:
                def __getattr__(_, name):
                    return getattr(lib, name)

                def decode_layers(_, *a):
                    ran["c_loop"] += 1
                    return lib.decode_layers(*a)
            decode_layers = Counting()
        self.lib = decode_layers
        try:
            out = forward(self, *args)
        finally:
            self.lib = lib
        ran["native"] += out is not None
        return out

    def spy_add_rows(self, x, y):
        ran["add_rows"] += 1
        return add_rows(self, x, y)

    monkeypatch.setattr(native_decode.NativeDecoder, "forward", spy_forward)
    monkeypatch.setattr(LinearLoRA, "add_rows", spy_add_rows)
    monkeypatch.setattr(native_decode, "_c_loop", path == "c_loop")
    worker = ours.engine.executor.worker
    lora, expected = references["r16_all"]
    worker.set_native_decode(path != "modules")
    n = 12  # a 6-row chunk, then 6 one-token steps
    try:
        got = our_logits(ours, probe_ids[:n], [6] + [1] * (n - 6), lora)
    finally:
        worker.set_native_decode(True)
    torch.testing.assert_close(got, expected[:n], rtol=1e-3, atol=1e-3)
    steps = n - 5
    want = {"c_loop": {"native": steps, "c_loop": steps, "add_rows": 0},
            "python_loop": {"native": steps, "c_loop": 0, "add_rows": steps * 4 * 30},
            "modules": {"native": 0, "c_loop": 0, "add_rows": 0}}[path]
    assert ran == want


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_mixed_batch_gives_each_request_its_own_greedy_output(ours, references):
    """Base and three adapters interleaved in one batch (the same prompt under each, so their
    KV must not be shared either): every request's greedy tokens equal its run alone."""
    loras = [None] + [references[n][0] for n in sorted(SPECS)]
    prompts = [p for p in PROMPTS for _ in loras]
    per_prompt = loras * len(PROMPTS)
    together = ours.generate(prompts, GREEDY, lora_request=per_prompt)
    for prompt, lora, out in zip(prompts, per_prompt, together):
        alone = ours.generate([prompt], GREEDY, lora_request=lora)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, (prompt, lora)
    for i in range(len(PROMPTS)):  # the adapters do steer generation
        outs = {tuple(o.outputs[0].token_ids) for o in together[i * 4:(i + 1) * 4]}
        assert len(outs) >= 3


@pytest.mark.parametrize("quantization,lora_dtype", [("int8", "auto"), ("gguf", "auto"),
                                                     ("gguf", "float32")])
def test_quantized_base_takes_adapter(quantization, lora_dtype, references, probe_ids):
    """int8 (RTN at load) and GGUF Q4_1 served natively: the adapter's term goes on the
    quantized projection's output, so its effect on the logits matches PEFT's (direction and
    size) up to the base's quantization error. (int4 RTN moves this model's logits more than
    the adapter does, so it is checked per layer, exactly, in test_lora_layer.py.)"""
    llm = LLM("smollm2-135m", dtype="float32", quantization=quantization,
              kv_cache_memory="16MiB", max_model_len=256, enable_lora=True,
              lora_dtype=lora_dtype)
    lora, expected = references["r16_all"]
    base_ref = references["base"][1]
    n = 12  # a chunk, then decode steps
    expected, base_ref = expected[:n], base_ref[:n]
    got = our_logits(llm, probe_ids[:n], [8] + [1] * (n - 8), lora)
    got_base = our_logits(llm, probe_ids[:n], [n])
    # lora_dtype auto on a quantized base: bf16 factors (read by the C decode path)
    factors = torch.bfloat16 if lora_dtype == "auto" else torch.float32
    assert llm.engine.executor.worker.lora.dtype == factors
    effect_ours, effect_ref = (got - got_base).flatten(), (expected - base_ref).flatten()
    cos = torch.nn.functional.cosine_similarity(effect_ours, effect_ref, dim=0).item()
    # how far we are from PEFT's logits, as a share of how far the adapter moves them
    miss = ((got - expected).norm() / (expected - base_ref).norm()).item()
    base_miss = ((got_base - base_ref).norm() / (expected - base_ref).norm()).item()
    print(f"{quantization}: cos {cos:.4f}, miss {miss:.4f} (base alone {base_miss:.4f})")
    # int8 RTN of every linear (lm_head too) is coarse, and more so on the larger activations
    # the adapter brings (0.24 on a Sapphire Rapids VM); Q4_1 served natively stays close
    # (0.001 with fp32 factors; bf16 factors round A and B in every layer: 0.025). A missing
    # shard or scaling would be far above every bound.
    bound = {"int8": 0.4, "gguf": 0.05 if factors == torch.bfloat16 else 0.02}[quantization]
    assert cos > 0.95 and miss < bound
    out = llm.generate([probe_ids[:n]], SamplingParams(max_tokens=1, temperature=0),
                       lora_request=lora)[0]
    assert out.outputs[0].token_ids == [int(got[-1].argmax())]


def test_prefix_cache_never_shares_blocks_between_adapters(ours, references):
    kv = ours.engine.kv_manager
    prompt = list(range(1000, 1000 + 3 * 16 + 5))  # three full blocks of 16 tokens, and more
    a, b = references["r8_qv"][0], references["r16_all"][0]
    one = SamplingParams(max_tokens=1, temperature=0)

    def hits(lora) -> int:
        before = kv.prefix_hits
        ours.generate([prompt], one, lora_request=lora)
        return kv.prefix_hits - before

    assert hits(a) == 0
    assert hits(b) == 0  # same tokens, another adapter: no hit
    assert hits(None) == 0  # nor for the base
    assert hits(a) >= 3 * 16 and hits(b) >= 3 * 16 and hits(None) >= 3 * 16
    kv.check_invariant()


def test_one_slot_serves_many_adapters_and_reloads_evicted(ours, references):
    """max_loras=1: the scheduler runs one adapter at a time (plus the base); max_cpu_loras=1:
    an adapter dropped from memory is read again when asked for; the slot rank grows from 8
    to 64 as larger adapters arrive. Outputs equal the 4-slot engine's."""
    small = LLM("smollm2-135m", dtype="float32", quantization="none", kv_cache_memory="16MiB",
                max_model_len=256, enable_lora=True, max_loras=1, max_cpu_loras=1)
    worker = small.engine.executor.worker
    manager = worker.lora
    per_step, ranks = [], []
    execute = worker.runner.execute

    def spy(batch):
        per_step.append({s.lora.lora_int_id for s in batch.sequences if s.lora is not None})
        out = execute(batch)
        ranks.append(manager.rank)
        return out

    worker.runner.execute = spy
    loras = [references[n][0] for n in ("r8_qv", "r16_all", "r64_mlp_rs")] + [None]
    prompts = [PROMPTS[0]] * len(loras)
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = small.generate(prompts, greedy, lora_request=loras)
    assert max(len(s) for s in per_step) == 1
    assert sorted(set(ranks)) == [8, 16, 64] and ranks == sorted(ranks)
    want = ours.generate(prompts, greedy, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    # max_cpu_loras=1, but an adapter stays in memory while requests run it: each was read
    # once, when its request came, and not again when it got the slot
    loads = manager.num_loads
    assert loads == 3
    again = small.generate([PROMPTS[0]], greedy, lora_request=loras[0])[0]
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert manager.num_loads == loads  # still in memory...
    assert manager.loaded_ids() == [loras[0].lora_int_id]  # ... and the idle ones left
    small.generate([PROMPTS[0]], greedy, lora_request=loras[1])
    assert manager.num_loads == loads + 1  # evicted, read again


def test_merge_writes_an_hf_model_with_the_adapter_folded_in(references, probe_ids, tmp_path):
    """`turbollm lora merge smollm2-135m ADAPTER OUT`: transformers loads OUT as a plain
    model whose logits are PEFT's merged model's."""
    from transformers import AutoModelForCausalLM
    from turbollm.cli import main
    lora, expected = references["r64_mlp_rs"]
    out = tmp_path / "merged"
    assert main(["lora", "merge", "smollm2-135m", lora.lora_path, str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(model, probe_ids), expected, rtol=1e-4, atol=1e-4)
    assert main(["lora", "merge", "smollm2-135m", str(tmp_path / "nowhere"), str(out)]) == 2
