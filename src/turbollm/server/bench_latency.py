"""Server latency and overhead benchmark: N concurrent non-streaming clients against a real
`turbollm serve` process, then the same requests through the offline `LLM.generate`.

    python -m turbollm.server.bench_latency --concurrency 1 8 32 --requests-per-client 2

For each concurrency c: c clients each send `requests-per-client` completions one after the
other (a 512-token prompt, a 313-token greedy answer with ignore_eos), and we report p50/p99
end-to-end latency and aggregate generated tok/s; then `LLM(max_num_seqs=c).generate` runs the
same prompts, and the ratio HTTP / offline tok/s is the server's overhead (target >= 0.9).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct token-id prompts of `length` tokens from the Python reference manual."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stride = max(1, (len(ids) - length) // max(count, 1))
    return [list(ids[i * stride:i * stride + length]) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


class ServeProcess:
    """`python -m turbollm.cli serve --port 0 ...`; the port is read from its log."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "turbollm.cli", "serve", "--port",
                                      "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.port: int | None = None
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            m = re.search(r"Uvicorn running on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def wait_ready(self, timeout: float = 300) -> str:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.log[-20:]))
            if self.port:
                url = f"http://127.0.0.1:{self.port}"
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_clients(url: str, model: str, prompts: list[list[int]], concurrency: int,
                      max_tokens: int) -> tuple[list[float], int, float]:
    """(latencies, generated tokens, wall seconds) of `concurrency` closed-loop clients."""
    import httpx
    queue = list(prompts)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, tokens, time.perf_counter() - t0


def offline_tok_s(engine_kwargs: dict, prompts: list[list[int]], concurrency: int,
                  max_tokens: int) -> float:
    """Generated tok/s of LLM.generate on the same prompts with max_num_seqs=concurrency."""
    from turbollm import LLM, SamplingParams
    llm = LLM(**{**engine_kwargs, "max_num_seqs": concurrency})
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    del llm
    return sum(o.num_generated_tokens for o in outs) / dt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--min-requests", type=int, default=4,
                   help="at least this many requests per concurrency level (for percentiles)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=313)
    p.add_argument("--engine-arg", action="append", default=[],
                   help="extra engine flag for both sides, e.g. --engine-arg=--num-threads=2")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    from turbollm.cli_args import add_engine_args, engine_kwargs
    engine_args = ["--model", args.model, *args.engine_arg,
                   "--max-num-seqs", str(max(args.concurrency))]
    engine_parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(engine_parser)
    # server flags among --engine-arg are left to the server process
    ekw = engine_kwargs(engine_parser.parse_known_args(engine_args)[0])
    ekw.pop("max_num_seqs")

    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import load_tokenizer_for
    tokenizer = load_tokenizer_for(resolve_model(args.model), None)
    def num_requests(c: int) -> int:
        return c * max(args.requests_per_client, -(-args.min_requests // c))

    total = max(num_requests(c) for c in args.concurrency)
    all_prompts = make_prompts(tokenizer, total, args.prompt_tokens)

    server = ServeProcess(engine_args)
    rows = []
    try:
        url = server.wait_ready()
        model = json.loads(__import__("httpx").get(url + "/v1/models").text)["data"][0]["id"]
        asyncio.run(run_clients(url, model, all_prompts[:1], 1, 8))  # warm-up
        for c in args.concurrency:
            prompts = all_prompts[:num_requests(c)]
            lat, toks, wall = asyncio.run(run_clients(url, model, prompts, c, args.max_tokens))
            rows.append({"concurrency": c, "requests": len(prompts),
                         "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                         "http_tok_s": toks / wall})
            print(f"c={c}: p50 {rows[-1]['p50_s']:.2f}s p99 {rows[-1]['p99_s']:.2f}s "
                  f"{rows[-1]['http_tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        server.stop()
    for row in rows:
        prompts = all_prompts[:row["requests"]]
        row["offline_tok_s"] = offline_tok_s(ekw, prompts, row["concurrency"], args.max_tokens)
        row["ratio"] = row["http_tok_s"] / row["offline_tok_s"]

    print(f"\nmodel {args.model}, prompt {args.prompt_tokens} tokens, answer {args.max_tokens} "
          f"tokens (greedy, ignore_eos), {os.cpu_count()} CPUs\n")
    print("| clients | requests | p50 e2e (s) | p99 e2e (s) | HTTP tok/s | offline tok/s | "
          "HTTP / offline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
              f"{r['http_tok_s']:.1f} | {r['offline_tok_s']:.1f} | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
