"""`turbollm bench soak`: a `turbollm serve` under steady load with clients hanging up at
random, for long enough to see leaks.

    turbollm bench soak --duration 600 --concurrency 8 --disconnect 0.25

--concurrency closed-loop clients stream completions of random lengths; a --disconnect share
of them hangs up after a random number of tokens. Every --window seconds: the server's resident
memory (from /proc), requests completed and dropped, and the completed requests' time to first
token (p50 / p99). At the end, once the clients stop: whether the server holds no request and
no KV block (its /metrics), and the memory growth from the end of the first window (warm-up)
to the last.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time

import httpx

from turbollm.bench.overload import p99


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r"^(turbollm_num_requests_\w+|turbollm_kv_cache_usage_ratio)(?:\{[^}]*\})?"
                       r" ([0-9.e+-]+)$", text, flags=re.M)
    return {name: float(v) for name, v in found}


async def client(http: httpx.AsyncClient, url: str, model: str, k: int, stop: float,
                 disconnect: float, log: list) -> None:
    rng = random.Random(k)
    while time.monotonic() < stop:
        body = {"model": model, "prompt": [rng.randrange(100, 20000)
                                           for _ in range(rng.randint(8, 256))],
                "max_tokens": rng.randint(8, 128), "ignore_eos": True, "stream": True,
                "temperature": 0.8}
        hang_up = rng.randint(1, body["max_tokens"]) if rng.random() < disconnect else None
        t0, first, events = time.monotonic(), None, 0
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                log.append((time.monotonic(), "error", None))
                await asyncio.sleep(0.1)  # a refusing server is not hammered
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                events += 1
                first = first if first is not None else time.monotonic() - t0
                if hang_up is not None and events >= hang_up:
                    break  # leaving the block closes the connection mid-stream
        log.append((time.monotonic(), "dropped" if hang_up is not None else "ok", first))


async def soak(url: str, pid: int, model: str, args) -> list[dict]:
    log: list = []
    windows = []
    start = time.monotonic()
    stop = start + args.duration

    async def sample():
        t = start
        while t < stop:
            t = min(stop, t + args.window)
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            done = [e for e in log if t - args.window < e[0] <= t]
            ttft = [e[2] for e in done if e[1] == "ok" and e[2] is not None]
            windows.append({"t_s": t - start, "rss_mib": rss_bytes(pid) / 2**20,
                            "ok": sum(e[1] == "ok" for e in done),
                            "dropped": sum(e[1] == "dropped" for e in done),
                            "errors": sum(e[1] == "error" for e in done),
                            "ttft_p50_s": statistics.median(ttft) if ttft else None,
                            "ttft_p99_s": p99(ttft) if ttft else None})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(
            max_connections=args.concurrency + 4)) as http:
        await asyncio.gather(sample(), *(client(http, url, model, k, stop, args.disconnect, log)
                                         for k in range(args.concurrency)))
    return windows


def format_windows(windows: list[dict]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.0f}"
    lines = ["| t (s) | RSS MiB | completed | dropped | errors | TTFT p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {w['t_s']:.0f} | {w['rss_mib']:.1f} | {w['ok']} | {w['dropped']} | "
              f"{w['errors']} | {ms(w['ttft_p50_s'])} / {ms(w['ttft_p99_s'])} |"
              for w in windows]
    return "\n".join(lines) + "\n"


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """The server's gauges once it holds no request (or when the timeout ends)."""
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        busy = sum(g.get(f"turbollm_num_requests_{k}", 0) for k in ("running", "waiting",
                                                                     "queued"))
        if not busy or time.monotonic() > deadline:
            return g
        time.sleep(0.5)


def run(args) -> int:
    from turbollm.bench.serve_vs_offline import served
    with served(args.engine_args) as (server, url, model):
        windows = asyncio.run(soak(url, server.proc.pid, model, args))
        idle = wait_idle(url)
        print(f"{args.concurrency} clients for {args.duration:g} s, {args.disconnect:.0%} "
              f"hanging up at random\n")
        print(format_windows(windows))
        growth = windows[-1]["rss_mib"] / windows[0]["rss_mib"] - 1
        print(f"RSS from the end of the first window to the last: {growth:+.1%}")
        print("after the load: " + ", ".join(f"{k} {v:g}" for k, v in sorted(idle.items())))
    return 0


def add_parser(modes) -> None:
    p = modes.add_parser("soak", help="steady load with random disconnects: memory, leaks and "
                         "latency over time", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--disconnect", type=float, default=0.25,
                   help="share of requests whose client hangs up mid-stream")
    p.add_argument("--window", type=float, default=60.0, help="seconds per reported window")
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="after --: `turbollm serve` flags")
    p.set_defaults(func=run)
