"""Peer engines for side-by-side measurements: Hugging Face transformers on the same weights."""
from __future__ import annotations

from pathlib import Path

import torch


def hf_state_dict_from_gguf(path: str | Path) -> tuple[dict, object]:
    """(tensors, LlamaConfig) as transformers' own GGUF loader reads the file.

    `from_pretrained(gguf_file=...)` needs `accelerate`; the checkpoint loader only needs a model
    skeleton to map names (it un-permutes q/k from the file's own head counts), so a meta-device
    Llama of the file's config is enough.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from turbollm.loader.gguf import GGUFCheckpoint
    cfg = {k: v for k, v in GGUFCheckpoint(path).hf_config.items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.LlamaConfig(**cfg)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return state, config


def hf_model_from_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' Llama with the GGUF's weights as read by transformers' own GGUF loader."""
    import transformers
    state, config = hf_state_dict_from_gguf(path)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def hf_model_from_dir(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' model from an HF directory."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


# ----- measurements of the peers, mirroring bench/measure.py for our engine -----
class _TimingStreamer:
    """generate()'s streamer hook: the first put() is the prompt, each later one a new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        import time
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, prompts: list[list[int]], n: int, streamer=None):
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=streamer)


@torch.inference_mode()
def hf_prefill_tok_s(model, prompts: list[list[int]]) -> float:
    """Best-of tok/s of one forward over each prompt (last-token logits only); [0] warms up."""
    import time
    model(torch.tensor([prompts[0]]), logits_to_keep=1)
    best = float("inf")
    for p in prompts[1:]:
        t = time.perf_counter()
        model(torch.tensor([p]), logits_to_keep=1)
        best = min(best, time.perf_counter() - t)
    return len(prompts[1]) / best


@torch.inference_mode()
def hf_decode_tok_s(model, prompt: list[int], n: int) -> float:
    """Batch-1 decode tok/s of generate(): time of n+1 tokens minus time of 1."""
    import time

    def timed(k):
        t = time.perf_counter()
        _hf_generate(model, [prompt], k)
        return time.perf_counter() - t
    timed(4)
    t1, tn = timed(1), timed(n + 1)
    return n / max(tn - t1, 1e-9)


@torch.inference_mode()
def hf_batch_point(model, prompts: list[list[int]], n: int) -> dict:
    """One padded batched generate() of n tokens each: aggregate tok/s and latencies."""
    import time
    s = _TimingStreamer()
    t0 = time.perf_counter()
    _hf_generate(model, prompts, n, s)
    dt = time.perf_counter() - t0
    tok = s.times[1:]
    return {"batch": len(prompts), "tok_s": len(prompts) * n / dt, "wall_s": dt, "e2e_s": dt,
            "ttft_s": tok[0] - t0 if tok else None,
            "tpot_s": (tok[-1] - tok[0]) / (len(tok) - 1) if len(tok) > 1 else None}


@torch.inference_mode()
def measure_hf(model, spec, prompts, stage=lambda s: None) -> dict:
    """transformers on the same prompts: forward for prefill, generate() for the rest (padded
    static batches: every request of a batch runs to the batch's length)."""
    import statistics
    import time

    from turbollm.bench.measure import peak_rss_bytes, tensor_bytes
    from turbollm.eval.perplexity import perplexity
    res: dict = {"weight_bytes": tensor_bytes(model),
                 "storage_dtype": str(model.dtype).replace("torch.", "")}
    cfg = model.config
    res["kv_bytes_per_token"] = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * \
        model.dtype.itemsize
    stage("prefill")
    res["prefill_tok_s"] = hf_prefill_tok_s(model, prompts.prefill)
    stage("decode")
    res["decode_tok_s"] = hf_decode_tok_s(model, prompts.decode, spec.decode_tokens)
    res["workloads"] = {}
    for w in spec.workload_list():
        stage(w.name)
        rows = []
        for p in prompts.workloads[w.name]:
            s = _TimingStreamer()
            t0 = time.perf_counter()
            _hf_generate(model, [p], w.output_tokens, s)
            end = time.perf_counter()
            tok = s.times[1:]  # times[0]: the prompt was handed over
            rows.append({"ttft_s": tok[0] - t0, "e2e_s": end - t0,
                         "tpot_s": (tok[-1] - tok[0]) / (len(tok) - 1) if len(tok) > 1
                         else None})
        res["workloads"][w.name] = {
            k: statistics.median(r[k] for r in rows if r[k] is not None)
            for k in ("ttft_s", "tpot_s", "e2e_s") if any(r[k] is not None for r in rows)}
        res["workloads"][w.name].update(requests=len(rows),
                                        output_tokens=len(rows) * w.output_tokens)
    res["batch"] = []
    for b in spec.batch_sizes:
        stage(f"batch {b}")
        res["batch"].append(hf_batch_point(model, prompts.batch[:b], spec.batch_output_tokens))
    stage("perplexity")
    res["perplexity"] = perplexity(lambda ids: model(torch.tensor([ids])).logits[0].float(),
                                   prompts.ppl, spec.ppl_max_length, spec.ppl_stride).perplexity
    stage("greedy")
    out = _hf_generate(model, prompts.agree, spec.agree_tokens)
    res["greedy_tokens"] = out[:, len(prompts.agree[0]):].tolist()
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def load_llamacpp(gguf_path: str | Path, threads: int, n_ctx: int, logits_all: bool = False):
    """llama-cpp-python's Llama on the GGUF file as it is (its own quantized kernels).

    `logits_all` (logits at every prompt position, for perplexity) makes a prefill also run the
    vocabulary projection on every row, so speed is measured without it."""
    from llama_cpp import Llama
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads,
                 n_threads_batch=threads, n_batch=512, logits_all=logits_all, verbose=False)


def llamacpp_system_info() -> str:
    """llama.cpp's own line of the CPU features its build uses (e.g. 'AVX512 = 1 | AMX_INT8 = 1')."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info()
    return (info.decode() if isinstance(info, bytes) else str(info)).strip()


def llamacpp_greedy(llm, prompt: list[int], n: int, times: list[float] | None = None) -> list[int]:
    """n greedy tokens from llama.cpp (no EOS stop); `times` gets the clock as each one is made."""
    import time
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if times is not None:
            times.append(time.perf_counter())
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def measure_llamacpp(llm, spec, prompts, stage=lambda s: None) -> dict:
    """llama.cpp through its Python binding: eval() for prefill, the token generator (greedy,
    no EOS stop) for decode and latency. Its Python API runs one sequence at a time, so there
    is no batch sweep; perplexity uses the same windows as ours."""
    import math
    import statistics
    import time

    import numpy as np

    from turbollm.bench.measure import peak_rss_bytes
    from turbollm.eval.perplexity import perplexity
    res: dict = {"weight_bytes": Path(llm.model_path).stat().st_size, "storage_dtype": "gguf",
                 "system": {"llama.cpp": llamacpp_system_info()}}

    def gen(prompt, n, times=None):
        return llamacpp_greedy(llm, prompt, n, times)

    stage("prefill")
    best = float("inf")
    for p in prompts.prefill:
        llm.reset()
        t = time.perf_counter()
        llm.eval(p)
        best = min(best, time.perf_counter() - t)
    res["prefill_tok_s"] = len(prompts.prefill[0]) / best
    stage("decode")
    gen(prompts.decode, 4)
    times: list[float] = []
    gen(prompts.decode, spec.decode_tokens + 1, times)
    res["decode_tok_s"] = spec.decode_tokens / max(times[-1] - times[0], 1e-9)
    res["workloads"] = {}
    for w in spec.workload_list():
        stage(w.name)
        rows = []
        for p in prompts.workloads[w.name]:
            times = []
            t0 = time.perf_counter()
            gen(p, w.output_tokens, times)
            rows.append({"ttft_s": times[0] - t0, "e2e_s": time.perf_counter() - t0,
                         "tpot_s": (times[-1] - times[0]) / max(len(times) - 1, 1)})
        res["workloads"][w.name] = {k: statistics.median(r[k] for r in rows)
                                    for k in ("ttft_s", "tpot_s", "e2e_s")}
        res["workloads"][w.name].update(requests=len(rows),
                                        output_tokens=len(rows) * w.output_tokens)
    res["batch"] = []
    stage("perplexity")
    scorer = load_llamacpp(llm.model_path, llm.n_threads, llm.n_ctx(), logits_all=True)

    def score(ids):
        scorer.reset()
        scorer.eval(ids)
        return torch.from_numpy(np.array(scorer.scores[:len(ids)], dtype=np.float32))
    res["perplexity"] = perplexity(score, prompts.ppl, spec.ppl_max_length,
                                   spec.ppl_stride).perplexity
    assert math.isfinite(res["perplexity"])
    stage("greedy")
    res["greedy_tokens"] = [gen(p, spec.agree_tokens) for p in prompts.agree]
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res
