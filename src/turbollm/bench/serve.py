"""`turbollm bench serve`: a load generator for any OpenAI-compatible endpoint.

Streaming requests (so TTFT and inter-token latency are seen from the client), sent either in a
closed loop (N clients, each sends its next request when the previous one finishes) or in an open
loop (Poisson arrivals at a given rate, whether or not earlier requests have finished).

    turbollm bench serve --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 64
    turbollm bench serve --base-url ... --request-rate 2 --dataset corpus --input-len 1024
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ServeRequest:
    prompt: str | list[int]  # token ids go to /v1/completions as they are (exact lengths)
    text: str  # the same prompt as text (chat endpoint)
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    status: str  # HTTP status code, or "transport" / "stream-error"
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # seconds since the run began
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    requested_tokens: int = 0  # max_tokens sent (with ignore_eos, what should come back)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ----- datasets -----
def synthetic_dataset(tokenizer, n: int, input_len: int, output_len: int,
                      range_ratio: float = 0.0, seed: int = 0) -> list[ServeRequest]:
    """Corpus token slices with lengths drawn uniformly in len * [1 - r, 1 + r]."""
    from turbollm.corpus import corpus_token_ids
    rng = random.Random(seed)
    ids = corpus_token_ids(tokenizer, max_tokens=max(20000, 4 * int(input_len * (1 + range_ratio))))
    out = []
    for _ in range(n):
        lo, hi = max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio)))
        olo, ohi = max(1, int(output_len * (1 - range_ratio))), max(1, int(output_len * (1 + range_ratio)))
        plen, olen = rng.randint(lo, hi), rng.randint(olo, ohi)
        start = rng.randrange(max(1, len(ids) - plen))
        prompt = ids[start:start + plen]
        out.append(ServeRequest(prompt, tokenizer.decode(prompt), len(prompt), olen))
    return out


_TASKS = ("Summarize the following text in a few sentences.",
          "Answer from this text only: what is its main subject, and which terms does it define?",
          "List the three most important facts stated in this text.")


def corpus_dataset(tokenizer, n: int, input_len: int, output_len: int,
                   seed: int = 0) -> list[ServeRequest]:
    """Input-heavy requests: a passage of ~input_len tokens of the built-in corpus and a task
    about it (summarize / answer from this text), sent as text."""
    from turbollm.corpus import corpus_prompts
    rng = random.Random(seed)
    out = []
    for passage in corpus_prompts(tokenizer, n, input_len, seed):
        text = f"{rng.choice(_TASKS)}\n\n{tokenizer.decode(passage)}\n\nAnswer:"
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        out.append(ServeRequest(text, text, len(ids), output_len))
    return out


# ----- one request -----
def _body(req: ServeRequest, model: str, endpoint: str, ignore_eos: bool, usage: bool,
          stream: bool = True) -> dict:
    body: dict = {"model": model, "max_tokens": req.output_len, "temperature": 0,
                  "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.text}]
    else:
        body["prompt"] = req.prompt
    if ignore_eos:
        body["ignore_eos"] = True  # an extension (ours, vLLM); --no-ignore-eos for others
    if usage and stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send_request(http, url: str, body: dict, t_run: float) -> RequestResult:
    """POST a streaming request; time every content-bearing SSE event."""
    import httpx
    t0 = time.perf_counter()
    res = RequestResult(ok=False, status="transport", start=t0 - t_run)
    if not body["stream"]:
        return await _send_whole(http, url, body, t0, res)
    stamps: list[float] = []
    usage = None
    try:
        async with http.stream("POST", url, json=body) as r:
            res.status = str(r.status_code)
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                res.e2e_s = time.perf_counter() - t0
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.status, res.error = "stream-error", str(event["error"])[:300]
                    break
                if event.get("usage"):
                    usage = event["usage"]
                for c in event.get("choices") or []:
                    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if piece:
                        stamps.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.status, res.error = "transport", f"{type(e).__name__}: {e}"[:300]
    res.e2e_s = time.perf_counter() - t0
    if res.error is not None:
        return res
    res.ok = True
    if stamps:
        res.ttft_s = stamps[0] - t0
        res.itl_s = [b - a for a, b in zip(stamps, stamps[1:])]
    res.output_tokens = usage["completion_tokens"] if usage else len(stamps)
    res.prompt_tokens = usage["prompt_tokens"] if usage else 0
    return res


async def _send_whole(http, url: str, body: dict, t0: float, res: RequestResult
                      ) -> RequestResult:
    """A request answered whole: only its end-to-end time and token counts."""
    import httpx
    try:
        r = await http.post(url, json=body)
        res.status = str(r.status_code)
        if r.status_code != 200:
            res.error = r.text[:300]
        else:
            usage = r.json()["usage"]
            res.ok = True
            res.output_tokens, res.prompt_tokens = usage["completion_tokens"], \
                usage["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.status, res.error = "transport", f"{type(e).__name__}: {e}"[:300]
    res.e2e_s = time.perf_counter() - t0
    return res


# ----- the load -----
async def run_load(base_url: str, requests: list[ServeRequest], model: str | None = None,
                   endpoint: str = "completions", concurrency: int | None = None,
                   request_rate: float = math.inf, max_concurrency: int | None = None,
                   ignore_eos: bool = True, usage: bool = True, api_key: str | None = None,
                   seed: int = 0, progress: bool = True, timeout: float = 3600,
                   stream: bool = True, stagger_s: float = 0.0
                   ) -> tuple[list[RequestResult], float, str]:
    """(results in request order, wall seconds, model name). Closed loop when `concurrency`
    is given (client k starts k * stagger_s after the first), else open loop at
    `request_rate` (inf: all at once) capped by max_concurrency."""
    import httpx
    from tqdm import tqdm
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or max_concurrency or len(requests)
    async with httpx.AsyncClient(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=limit + 4)) as http:
        if model is None:
            r = await http.get(base + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        bodies = [_body(q, model, endpoint, ignore_eos, usage, stream) for q in requests]
        results: list[RequestResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="bench serve", unit="req", disable=not progress)
        t_run = time.perf_counter()

        async def one(i: int) -> None:
            results[i] = await send_request(http, base + path, bodies[i], t_run)
            results[i].requested_tokens = bodies[i]["max_tokens"]
            bar.update(1)

        if concurrency:
            queue = iter(range(len(requests)))

            async def client(k: int) -> None:
                await asyncio.sleep(k * stagger_s)
                for i in queue:  # a shared iterator: each index is taken once
                    await one(i)
            await asyncio.gather(*(client(k) for k in range(concurrency)))
        else:
            rng = random.Random(seed)
            sem = asyncio.Semaphore(limit)

            async def capped(i: int) -> None:
                async with sem:
                    await one(i)
            tasks = []
            for i in range(len(requests)):
                tasks.append(asyncio.create_task(capped(i)))
                if math.isfinite(request_rate) and i + 1 < len(requests):
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_run
        bar.close()
    return results, wall, model  # type: ignore[return-value]


# ----- the report -----
def _pcts(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors_by_status": errors, "wall_s": wall,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "requests_per_s": len(ok) / wall if wall else None,
        "output_tok_s": out_tokens / wall if wall else None,
        "ttft_s": _pcts([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _pcts([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _pcts([x for r in ok for x in r.itl_s]),
        "e2e_s": _pcts([r.e2e_s for r in ok]),
    }


def format_summary(s: dict, title: str) -> str:
    def ms(d, k):
        return "" if d[k] is None else f"{d[k] * 1e3:.1f}"
    lines = [title, "",
             f"requests {s['requests']} (completed {s['completed']}, failed {s['failed']}"
             + (f": {s['errors_by_status']}" if s["errors_by_status"] else "") + ")",
             f"wall {s['wall_s']:.2f} s, {s['requests_per_s']:.2f} req/s, "
             f"{s['output_tok_s']:.1f} output tok/s, prompt tokens {s['prompt_tokens']}, "
             f"output tokens {s['output_tokens']}", "",
             "| metric (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                      ("e2e_s", "end-to-end")):
        d = s[key]
        lines.append(f"| {name} | {ms(d, 'mean')} | {ms(d, 'p50')} | {ms(d, 'p90')} | "
                     f"{ms(d, 'p99')} |")
    return "\n".join(lines) + "\n"


def plot_serve(results: list[RequestResult], out_dir: str | Path, title: str) -> Path:
    """serve_latency.png: CDFs of TTFT, ITL and e2e, and each request's span over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, name, vals in ((axes[0], "TTFT", [r.ttft_s for r in ok if r.ttft_s is not None]),
                           (axes[1], "inter-token latency", [x for r in ok for x in r.itl_s]),
                           (axes[2], "end-to-end", [r.e2e_s for r in ok])):
        v = sorted(x * 1e3 for x in vals)
        if v:
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))])
        ax.set(xlabel="ms", ylabel="fraction of requests" if name != "inter-token latency"
               else "fraction of gaps", title=f"{name} (CDF)")
    for i, r in enumerate(results):
        axes[3].plot([r.start, r.start + r.e2e_s], [i, i], color="C0" if r.ok else "C3")
    axes[3].set(xlabel="seconds into the run", ylabel="request", title="request spans "
                "(red: failed)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "serve_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- command line -----
def add_serve_bench_parser(modes) -> None:
    p = modes.add_parser("serve", help="load an OpenAI-compatible server and report latency",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--served-model", default=None,
                   help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["synthetic", "corpus"], default="synthetic",
                   help="synthetic: corpus token slices of the given lengths (sent as token ids "
                        "to completions); corpus: summarize / answer-from-this-text prompts")
    p.add_argument("--tokenizer", dest="serve_tokenizer", default="smollm2-135m",
                   help="model whose tokenizer cuts the prompts (any --model form)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="synthetic lengths uniform in len * [1 - r, 1 + r]")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=None,
                      help="closed loop: this many clients, each one request at a time")
    loop.add_argument("--request-rate", type=float, default=None,
                      help="open loop: Poisson arrivals per second (inf = all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="open loop: most requests in flight")
    p.add_argument("--ignore-eos", action=argparse_bool(), default=True,
                   help="ask for exactly output-len tokens (an extension; off for strict APIs)")
    p.add_argument("--usage", action=argparse_bool(), default=True,
                   help="ask for a final usage chunk (stream_options.include_usage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary and every request to this file")
    p.add_argument("--plot-dir", help="write serve_latency.png here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_serve_bench)


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction


def run_serve_bench(args) -> int:
    from turbollm.worker.model_loader import load_tokenizer_for
    from turbollm.loader.resolve import resolve_model
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0")
    tokenizer = load_tokenizer_for(resolve_model(args.serve_tokenizer), None)
    if args.dataset == "synthetic":
        reqs = synthetic_dataset(tokenizer, args.num_prompts, args.input_len, args.output_len,
                                 args.range_ratio, args.seed)
    else:
        reqs = corpus_dataset(tokenizer, args.num_prompts, args.input_len, args.output_len,
                              args.seed)
    rate = math.inf if args.request_rate is None else args.request_rate
    concurrency = args.concurrency if args.request_rate is None else None
    if concurrency is None and args.request_rate is None:
        concurrency = 1
    results, wall, model = asyncio.run(run_load(
        args.base_url, reqs, args.served_model, args.endpoint, concurrency, rate,
        args.max_concurrency, args.ignore_eos, args.usage, args.api_key, args.seed,
        not args.no_progress))
    summary = summarize(results, wall)
    mode = f"closed loop, {concurrency} clients" if concurrency else \
        f"open loop, {rate} req/s (Poisson)"
    title = (f"{args.base_url} model {model}, {args.endpoint}, {args.dataset} "
             f"{args.input_len} in / {args.output_len} out, {mode}")
    print(format_summary(summary, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "summary": summary,
                       "requests": [asdict(r) for r in results]}, f, indent=2)
    if args.plot_dir:
        print(f"wrote {plot_serve(results, args.plot_dir, title)}", file=sys.stderr)
    return 0
