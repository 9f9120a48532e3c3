"""A/B of the C decode path (models/native_decode.py) against the module path, in one process.

    python -m turbollm.bench.native_decode [--engine-arg quantization=none] [--rounds 6]

One request (512-token prompt) decodes on one engine; rounds of 20 steps alternate between the
two paths, so both see the same context lengths and the same machine noise. Prints the best
and median ms per step of each path and the ratio of the bests.
"""
from __future__ import annotations

import argparse
import statistics
import time

from turbollm import LLM, SamplingParams
from turbollm.plan.validate import _engine_kwargs


def step_times(engine, rounds: int, steps: int) -> dict[bool, list[float]]:
    """ms per decode step of each path (True = native), `rounds` alternating rounds."""
    times: dict[bool, list[float]] = {True: [], False: []}
    worker = engine.executor.worker
    try:
        for _ in range(rounds):
            for native in (True, False):
                worker.set_native_decode(native)
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                times[native].append((time.perf_counter() - t0) / steps * 1e3)
    finally:
        worker.set_native_decode(engine.config.kernel.native_decode)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for turbollm.LLM (repeatable), e.g. quantization=none")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    llm = LLM(**_engine_kwargs(args.engine_arg))
    engine = llm.engine
    total = 5 + 2 * args.rounds * args.steps + 1
    engine.add_request("ab", list(range(300, 812)),
                       SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True))
    for _ in range(5):  # prefill and warm-up
        engine.step()
    times = step_times(engine, args.rounds, args.steps)
    for native, label in ((True, "native"), (False, "module")):
        t = times[native]
        print(f"{label}: {min(t):.2f} ms/step best, {statistics.median(t):.2f} median")
    print(f"module / native (best): {min(times[False]) / min(times[True]):.2f}x")


if __name__ == "__main__":
    main()
