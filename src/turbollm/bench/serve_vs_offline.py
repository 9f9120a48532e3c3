"""`turbollm bench serve-vs-offline`: the same load through `turbollm serve` and through the
engine in this process, side by side, so what the HTTP path costs is measured, not guessed.

    turbollm bench serve-vs-offline --concurrency 1 4 16 64 -- --dtype float32

At each concurrency C, C closed-loop clients (the k-th starts k * --stagger seconds after the
first, as real clients arrive) send --requests-per-client requests each (token-id prompts of
--input-len tokens, greedy answers of exactly --output-len tokens). Served: streamed
completions from a `turbollm serve` child started with the engine flags given after `--`,
timed per SSE event; the server's own /metrics TTFT and time per output token are read
before and after, to compare with what the client saw. Offline: an LLMEngine built from the
same flags runs the same requests with the same arrivals, and a step that gives a request new
tokens counts as one event. Output tok/s, TTFT and inter-token gaps are reported for both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from turbollm.bench.serve import RequestResult, ServeRequest, run_load, summarize, \
    synthetic_dataset

_SERVER_METRICS = {"ttft": "turbollm_time_to_first_token_seconds",
                   "tpot": "turbollm_time_per_output_token_seconds"}


@contextmanager
def served(engine_args: list[str]):
    """(child, url, model id) of a `turbollm serve` started with these flags ('--' dropped),
    ready; stopped on leaving. httpx's line per request is silenced for the load's output."""
    import httpx
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = ServeProcess([a for a in engine_args if a != "--"])
    try:
        url = server.wait_ready()
        yield server, url, httpx.get(url + "/v1/models").json()["data"][0]["id"]
    finally:
        server.stop()


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


# ----- offline: the same closed loop, in this process -----
def offline_load(engine, requests: list[ServeRequest], concurrency: int, stagger_s: float
                 ) -> tuple[list[RequestResult], float]:
    """(results in request order, wall seconds) of `concurrency` virtual closed-loop clients
    driving `engine` (an LLMEngine) step by step."""
    from turbollm.sampling_params import SamplingParams
    results: list[RequestResult | None] = [None] * len(requests)
    t_run = time.perf_counter()
    ready_at: list[float | None] = [t_run + k * stagger_s for k in range(concurrency)]
    active: dict[str, dict] = {}
    taken = 0
    while taken < len(requests) or active:
        now = time.perf_counter()
        for c, at in enumerate(ready_at):
            if at is not None and at <= now and taken < len(requests):
                req, rid = requests[taken], f"offline-{taken}"
                engine.add_request(rid, req.prompt, SamplingParams(
                    max_tokens=req.output_len, temperature=0.0, ignore_eos=True))
                active[rid] = {"i": taken, "client": c, "t0": now, "stamps": [], "n": 0}
                ready_at[c] = None
                taken += 1
        if not active:
            time.sleep(max(0.0, min(t for t in ready_at if t is not None) - now))
            continue
        outs = engine.step()
        t = time.perf_counter()
        for out in outs:
            a = active[out.request_id]
            n = len(out.outputs[0].token_ids)
            if n > a["n"]:
                a["stamps"].append(t)
                a["n"] = n
            if out.finished:
                del active[out.request_id]
                ready_at[a["client"]] = t
                stamps = a["stamps"]
                results[a["i"]] = RequestResult(
                    ok=out.error is None, status="200" if out.error is None else "error",
                    prompt_tokens=len(out.prompt_token_ids), output_tokens=a["n"],
                    start=a["t0"] - t_run, e2e_s=t - a["t0"],
                    ttft_s=stamps[0] - a["t0"] if stamps else None,
                    itl_s=[y - x for x, y in zip(stamps, stamps[1:])],
                    requested_tokens=requests[a["i"]].output_len, error=out.error)
    return results, time.perf_counter() - t_run  # type: ignore[return-value]


# ----- the server's own view -----
def server_means(before: str, after: str) -> dict:
    """Mean TTFT and time per output token the server recorded between two /metrics texts."""
    def sums(text: str) -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        return {s.name: s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name.endswith(("_sum", "_count"))}
    b, a = sums(before), sums(after)
    out = {}
    for key, name in _SERVER_METRICS.items():
        count = a.get(name + "_count", 0.0) - b.get(name + "_count", 0.0)
        total = a.get(name + "_sum", 0.0) - b.get(name + "_sum", 0.0)
        out[key] = total / count if count else None
    return out


def client_means(results: list[RequestResult]) -> dict:
    """The same means as the client measured them."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    return {"ttft": sum(ttft) / len(ttft) if ttft else None,
            "tpot": sum(tpot) / len(tpot) if tpot else None}


# ----- the run -----
def _engine_setup(engine_args: list[str]) -> tuple[dict, str]:
    """(LLMEngine keyword arguments, model) from the engine flags both sides get."""
    from turbollm.cli_args import add_engine_args, engine_kwargs
    parser = argparse.ArgumentParser(prog="engine flags", add_help=False)
    add_engine_args(parser)
    kwargs = engine_kwargs(parser.parse_args(engine_args))
    return kwargs, kwargs.get("model") or "smollm2-135m"


def run(args) -> int:
    from turbollm.engine.llm_engine import LLMEngine
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import load_tokenizer_for

    engine_args = [a for a in args.engine_args if a != "--"]
    kwargs, model = _engine_setup(engine_args)
    tokenizer = load_tokenizer_for(resolve_model(model), None)
    per_level = {c: synthetic_dataset(tokenizer, c * args.requests_per_client, args.input_len,
                                      args.output_len, seed=args.seed + c)
                 for c in args.concurrency}
    warm = synthetic_dataset(tokenizer, 1, 16, 4, seed=args.seed)
    rows = {c: {"clients": c, "requests": len(r)} for c, r in per_level.items()}

    server = ServeProcess(engine_args)
    try:
        import httpx
        url = server.wait_ready()
        asyncio.run(run_load(url, warm, concurrency=1, progress=False))
        for c, reqs in per_level.items():
            before = httpx.get(url + "/metrics", timeout=30).text
            results, wall, _ = asyncio.run(run_load(
                url, reqs, concurrency=c, progress=False, stream=args.stream,
                stagger_s=args.stagger))
            after = httpx.get(url + "/metrics", timeout=30).text
            rows[c]["served"] = summarize(results, wall)
            rows[c]["server_metrics"] = server_means(before, after)
            rows[c]["client_metrics"] = client_means(results)
            print(f"served  c={c}: {rows[c]['served']['output_tok_s']:.1f} tok/s",
                  file=sys.stderr)
    finally:
        server.stop()

    engine = LLMEngine.from_kwargs(**kwargs)
    offline_load(engine, warm, 1, 0.0)
    for c, reqs in per_level.items():
        results, wall = offline_load(engine, reqs, c, args.stagger)
        rows[c]["offline"] = summarize(results, wall)
        print(f"offline c={c}: {rows[c]['offline']['output_tok_s']:.1f} tok/s", file=sys.stderr)

    print(format_table(list(rows.values()), args, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       "rows": list(rows.values())}, f, indent=2)
    return 0


def _ms(d: dict, key: str) -> str:
    return "-" if d.get(key) is None else f"{d[key] * 1e3:.1f}"


def format_table(rows: list[dict], args, model: str) -> str:
    mode = "streamed" if args.stream else "whole answers (not streamed)"
    lines = [f"model {model}, {args.input_len}-token prompts, {args.output_len}-token greedy "
             f"answers, {mode}, clients starting {args.stagger * 1e3:.0f} ms apart, "
             f"{os.cpu_count()} CPUs", "",
             "| clients | requests | served tok/s | offline tok/s | served / offline | "
             "TTFT p50 / p99 ms served | offline | ITL p50 / p99 ms served | offline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, o = r["served"], r["offline"]
        lines.append(
            f"| {r['clients']} | {r['requests']} | {s['output_tok_s']:.1f} | "
            f"{o['output_tok_s']:.1f} | {s['output_tok_s'] / o['output_tok_s']:.2f}x | "
            f"{_ms(s['ttft_s'], 'p50')} / {_ms(s['ttft_s'], 'p99')} | "
            f"{_ms(o['ttft_s'], 'p50')} / {_ms(o['ttft_s'], 'p99')} | "
            f"{_ms(s['itl_s'], 'p50')} / {_ms(s['itl_s'], 'p99')} | "
            f"{_ms(o['itl_s'], 'p50')} / {_ms(o['itl_s'], 'p99')} |")
    lines += ["", "The server's /metrics against the client (means, ms):", "",
              "| clients | TTFT server | TTFT client | time per output token server | client |",
              "|---|---|---|---|---|"]
    for r in rows:
        sv, cl = r["server_metrics"], r["client_metrics"]
        lines.append(f"| {r['clients']} | {_ms(sv, 'ttft')} | {_ms(cl, 'ttft')} | "
                     f"{_ms(sv, 'tpot')} | {_ms(cl, 'tpot')} |")
    return "\n".join(lines) + "\n"


def add_parser(modes) -> None:
    p = modes.add_parser("serve-vs-offline", help="the same load served over HTTP and run "
                         "offline, side by side", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--stagger", type=float, default=0.05,
                   help="seconds between the clients' first requests")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="streamed completions (else whole answers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every row to this file")
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="after --: engine flags for both sides (e.g. -- --dtype float32)")
    p.set_defaults(func=run)
