"""One completion with n = 4 against four n = 1 completions of the same 512-token prompt sent at
once, through `turbollm serve` (default configuration): whole answers of 128 sampled tokens, two
rounds, generated tok/s of each (`python scripts/serve_n_vs_single.py`)."""
from __future__ import annotations

import asyncio
import time

import httpx

from turbollm.bench.serve_vs_offline import ServeProcess
from turbollm.corpus import corpus_token_ids
from turbollm.loader.resolve import resolve_model
from turbollm.worker.model_loader import load_tokenizer_for

PROMPT_TOKENS, ANSWER_TOKENS, N = 512, 128, 4


def body(model: str, prompt: list[int], n: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": ANSWER_TOKENS, "temperature": 0.8,
            "n": n, "ignore_eos": True}


async def measure(url: str, ids: list[int]) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        model = (await http.get(url + "/v1/models")).json()["data"][0]["id"]
        await http.post(url + "/v1/completions", json=body(model, ids[:16], 1))  # warm-up
        total = N * ANSWER_TOKENS
        for rnd in range(2):
            prompt = ids[1000 * rnd:1000 * rnd + PROMPT_TOKENS]
            t = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body(model, prompt, N))
            one = time.perf_counter() - t
            assert r.json()["usage"]["completion_tokens"] == total, r.text[:300]
            prompt = ids[5000 + 1000 * rnd:5000 + 1000 * rnd + PROMPT_TOKENS]
            t = time.perf_counter()
            await asyncio.gather(*(http.post(url + "/v1/completions", json=body(model, prompt, 1))
                                   for _ in range(N)))
            many = time.perf_counter() - t
            print(f"round {rnd}: one request with n={N} {total / one:.1f} tok/s; {N} requests "
                  f"with n=1 {total / many:.1f} tok/s")


def main() -> None:
    ids = corpus_token_ids(load_tokenizer_for(resolve_model("smollm2-135m"), None),
                           max_tokens=20000)
    server = ServeProcess([])
    try:
        asyncio.run(measure(server.wait_ready(), ids))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
