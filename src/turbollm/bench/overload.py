"""`turbollm bench overload`: what a `turbollm serve` does with more requests than it can serve.

    turbollm bench overload --multiple 3 --duration 60 -- --max-queue-delay 0.5

Three phases against one server child (started with the flags after `--`): the unloaded time
to first token (requests one at a time), the capacity (requests/s completed by --concurrency
closed-loop clients; or --capacity, e.g. measured on the same server without its shedding
flags, whose refusals would lower it), then an open loop (Poisson arrivals) at --multiple x
that capacity for --duration seconds. Reported: how many requests were admitted, how fast the
refused ones got their 429, and the admitted requests' time to first token against the
unloaded one. The same functions drive tests/server/test_server_overload.py against an
in-process server.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    status: int          # 200, 429, ...
    latency_s: float     # to the first token (200) or to the refusal
    end_s: float         # monotonic time the request ended


def body(model: str, input_len: int, output_len: int, i: int) -> dict:
    """A streamed completion of exactly output_len tokens on a token-id prompt."""
    rng = random.Random(i)
    return {"model": model, "prompt": [rng.randrange(100, 20000) for _ in range(input_len)],
            "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True}


async def one(http: httpx.AsyncClient, url: str, req: dict) -> Outcome:
    t0 = time.monotonic()
    async with http.stream("POST", url + "/v1/completions", json=req) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, time.monotonic() - t0, time.monotonic())
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - t0
    return Outcome(200, first if first is not None else time.monotonic() - t0, time.monotonic())


def _client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 16))


async def unloaded_ttft(url: str, model: str, n: int, input_len: int, output_len: int
                        ) -> list[float]:
    """Time to first token of n requests sent one at a time, after two not counted (the
    server's first requests build kernels and caches, which would set the p99)."""
    async with _client(1) as http:
        return [(await one(http, url, body(model, input_len, output_len, i))).latency_s
                for i in range(-2, n)][2:]


async def capacity(url: str, model: str, clients: int, seconds: float, input_len: int,
                   output_len: int) -> float:
    """Requests/s that `clients` closed-loop clients complete."""
    done = []
    stop = time.monotonic() + seconds

    async def loop(k: int, http):
        i = 0
        while time.monotonic() < stop:
            done.append(await one(http, url, body(model, input_len, output_len, k * 1000 + i)))
            i += 1
    t0 = time.monotonic()
    async with _client(clients) as http:
        await asyncio.gather(*(loop(k, http) for k in range(clients)))
    return sum(o.status == 200 for o in done) / (time.monotonic() - t0)


async def open_loop(url: str, model: str, rate: float, seconds: float, input_len: int,
                    output_len: int, seed: int = 0) -> list[Outcome]:
    """Poisson arrivals at `rate` requests/s for `seconds`, none waiting for another."""
    rng = random.Random(seed)
    tasks = []
    async with _client(int(rate * seconds) + 1) as http:
        t = time.monotonic()
        end = t + seconds
        i = 0
        while t < end:
            tasks.append(asyncio.create_task(one(http, url, body(model, input_len, output_len,
                                                                   10**6 + i))))
            i += 1
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.monotonic()))
        return list(await asyncio.gather(*tasks))


def _quantile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def p99(values: list[float]) -> float:
    found = _quantile(values, 99)
    return float("nan") if found is None else found


def summary(unloaded: list[float], cap: float, rate: float, outcomes: list[Outcome],
            seconds: float) -> dict:
    admitted = [o.latency_s for o in outcomes if o.status == 200]
    refused = [o.latency_s for o in outcomes if o.status == 429]
    return {"unloaded_ttft_p50_s": statistics.median(unloaded),
            "unloaded_ttft_p99_s": p99(unloaded), "capacity_rps": cap, "offered_rps": rate,
            "requests": len(outcomes), "admitted": len(admitted), "refused_429": len(refused),
            "admitted_rps": len(admitted) / seconds,
            "other": len(outcomes) - len(admitted) - len(refused),
            "refusal_p99_s": p99(refused) if refused else None,
            "admitted_ttft_p50_s": statistics.median(admitted) if admitted else None,
            "admitted_ttft_p90_s": _quantile(admitted, 90),
            "admitted_ttft_p99_s": p99(admitted) if admitted else None,
            # the admitted requests that started later than twice the unloaded p99
            "admitted_slow": sum(t > 2 * p99(unloaded) for t in admitted)}


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.0f}"
    ratio = (s["admitted_ttft_p99_s"] / s["unloaded_ttft_p99_s"]
             if s["admitted_ttft_p99_s"] is not None else float("nan"))
    return "\n".join([
        "| capacity req/s | offered req/s | requests | admitted (req/s) | 429 | other | 429 p99 "
        "ms | unloaded TTFT p50 / p99 ms | admitted TTFT p50 / p90 / p99 ms | admitted p99 / "
        "unloaded p99 | admitted > 2x unloaded p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['capacity_rps']:.2f} | {s['offered_rps']:.2f} | {s['requests']} | "
        f"{s['admitted']} ({s['admitted_rps']:.2f}) | {s['refused_429']} | {s['other']} | "
        f"{ms(s['refusal_p99_s'])} | {ms(s['unloaded_ttft_p50_s'])} / "
        f"{ms(s['unloaded_ttft_p99_s'])} | {ms(s['admitted_ttft_p50_s'])} / "
        f"{ms(s['admitted_ttft_p90_s'])} / {ms(s['admitted_ttft_p99_s'])} | {ratio:.2f}x | "
        f"{s['admitted_slow']} |"]) + "\n"


def run(args) -> int:
    from turbollm.bench.serve_vs_offline import served
    with served(args.engine_args) as (_, url, model):
        shape = (args.input_len, args.output_len)
        unloaded = asyncio.run(unloaded_ttft(url, model, 20, *shape))
        cap = args.capacity or asyncio.run(
            capacity(url, model, args.concurrency, args.capacity_seconds, *shape))
        rate = args.multiple * cap
        outcomes = asyncio.run(open_loop(url, model, rate, args.duration, *shape, args.seed))
        measured = ("given" if args.capacity else f"from {args.concurrency} closed-loop clients "
                    f"over {args.capacity_seconds:g} s")
        print(f"{args.input_len}-token prompts, {args.output_len}-token answers; capacity "
              f"{measured}; open loop at {args.multiple:g}x for {args.duration:g} s\n")
        print(format_summary(summary(unloaded, cap, rate, outcomes, args.duration)))
    return 0


def add_parser(modes) -> None:
    p = modes.add_parser("overload", help="open-loop overload of a `turbollm serve`: 429s and "
                         "the admitted requests' time to first token",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--multiple", type=float, default=3.0, help="offered load / capacity")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    p.add_argument("--concurrency", type=int, default=8,
                   help="closed-loop clients that measure the capacity")
    p.add_argument("--capacity-seconds", type=float, default=20.0)
    p.add_argument("--capacity", type=float, default=None,
                   help="requests/s to take as the capacity instead of measuring it (e.g. as "
                   "measured on the server without its shedding flags)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="after --: `turbollm serve` flags (e.g. -- --max-queue-delay 0.5)")
    p.set_defaults(func=run)
