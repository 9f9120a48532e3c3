"""The outputs-in-lanes kernels (quantization/csrc/lowbit_lanes.h) against the row kernels, on
this CPU: (1) one int4 G = 32 linear of SmolLM2-135M's shapes, us per call at each row count;
(2) the bundled model's prompt processing in chunks of C tokens (one 512-token prompt,
`max_num_batched_tokens = C`), ms per prompt token, lanes on / off alternating by round;
(3) its decode steps at batch B (greedy, 32-token prompts), ms per step, lanes on / off.
`python scripts/lanes_speed.py`; needs an AVX-512 build of the kernels (else it says so)."""
from __future__ import annotations

import random
import time

import torch

from turbollm.engine.llm_engine import LLMEngine
from turbollm.layers import prefill_gemm
from turbollm.quantization import kernels, native
from turbollm.sampling_params import SamplingParams

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in): o_proj, gate/up half, down
ROWS = [1, 4, 8, 16, 32, 64, 128]
CHUNKS = [16, 32, 64, 128]


def _us(fn, reps: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def kernel_table() -> None:
    L = native.lanes()
    print("| out x in | rows | row kernel us | lanes us | lanes speed-up |\n|---|---|---|---|---|")
    for n, k in SHAPES:
        torch.manual_seed(0)
        st = kernels.int4_pack_minform(torch.randint(0, 16, (n, k)),
                                       (torch.rand(n, k // 32) * 0.02).half(),
                                       (-torch.rand(n, k // 32) * 0.1).half(), 32)
        args = (st.packed.data_ptr(), st.scales.data_ptr(), st.offsets.data_ptr(), 0)
        for m in ROWS:
            x, y = torch.randn(m, k), torch.empty(m, n)
            rows = _us(lambda: L.q4_gemm_a16(x.data_ptr(), m, *args, y.data_ptr(), n, k, 32))
            lanes = _us(lambda: L.q4_gemm_lanes(x.data_ptr(), m, *args, y.data_ptr(), n, k, 32))
            print(f"| {n} x {k} | {m} | {rows:.0f} | {lanes:.0f} | {rows / lanes:.2f}x |")


def chunk_table(rounds: int = 3) -> None:
    engines = {c: LLMEngine.from_kwargs(max_num_batched_tokens=c) for c in CHUNKS}
    on = kernels.LANES_MAX_ROWS
    rng = random.Random(0)
    ms: dict = {}
    for r in range(rounds):
        for lanes in (True, False):
            kernels.LANES_MAX_ROWS = on if lanes else 0
            for c, eng in engines.items():
                eng.add_request(f"r{r}{lanes}", [rng.randrange(100, 30000) for _ in range(512)],
                                SamplingParams(max_tokens=1, ignore_eos=True))
                s0, n0 = eng.stats.prefill_seconds, eng.stats.prefill_tokens
                eng.run_until_done()
                per = (eng.stats.prefill_seconds - s0) / (eng.stats.prefill_tokens - n0) * 1e3
                ms.setdefault((c, lanes), []).append(per)
    kernels.LANES_MAX_ROWS = on
    print("\n| chunk | ms / prompt token, lanes (per round) | row kernels or widened bf16 | "
          "best off / best on |\n|---|---|---|---|")
    for c in CHUNKS:
        a, b = ms[(c, True)], ms[(c, False)]
        print(f"| {c} | {' '.join(f'{v:.2f}' for v in a)} | {' '.join(f'{v:.2f}' for v in b)} "
              f"| {min(b) / min(a):.2f}x |")


def decode_table(rounds: int = 3) -> None:
    eng = LLMEngine.from_kwargs()
    lo, rng = kernels.LANES_MIN_ROWS, random.Random(1)
    print("\n| batch | ms / decode step, lanes (per round) | row kernels | off / on (medians) |"
          "\n|---|---|---|---|")
    for batch in (4, 8, 16):
        ms: dict = {True: [], False: []}
        for r in range(rounds):
            for lanes in (True, False):
                kernels.LANES_MIN_ROWS = 4 if lanes else 10_000
                for i in range(batch):
                    eng.add_request(f"d{batch}-{r}-{lanes}-{i}",
                                    [rng.randrange(100, 30000) for _ in range(32)],
                                    SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
                eng.step()  # the prompts
                t, n = time.perf_counter(), 0
                while eng.has_unfinished_requests():
                    eng.step()
                    n += 1
                ms[lanes].append((time.perf_counter() - t) / n * 1e3)
        kernels.LANES_MIN_ROWS = lo
        on, off = sorted(ms[True])[rounds // 2], sorted(ms[False])[rounds // 2]
        print(f"| {batch} | {' '.join(f'{v:.1f}' for v in ms[True])} | "
              f"{' '.join(f'{v:.1f}' for v in ms[False])} | {off / on:.2f}x |")


def main() -> None:
    if native.lanes() is None:
        print("no lanes kernels here: the kernel library is not an AVX-512 build")
        return
    prefill_gemm.use_bf16(True)
    kernel_table()
    chunk_table()
    decode_table()


if __name__ == "__main__":
    main()
