"""Decode tok/s of the bundled model at batch 16, 32 and 64 (default configuration), through the
public API only, so the same file measures any revision
(`PYTHONPATH=<checkout>/src python scripts/batch_decode_speed.py`). Each batch: 128-token random
prompts prefilled first, then the median of 15 decode steps. Prints one JSON line."""
from __future__ import annotations

import json
import random
import statistics
import time

from turbollm import LLM, SamplingParams


def main() -> None:
    engine = LLM().engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    out = {}
    for batch in (16, 32, 64):
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, [rng.randrange(100, 30000) for _ in range(128)], params)
        sched = engine.scheduler
        while sched.waiting or any(r.is_prefilling for r in sched.running):
            engine.step()
        for _ in range(3):
            engine.step()
        times = []
        for _ in range(15):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        out[f"decode_b{batch}_tok_s"] = round(batch / statistics.median(times), 1)
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
