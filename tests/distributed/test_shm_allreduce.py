"""The shared-memory collectives against torch's sum and cat, in two real processes."""
import hashlib

import pytest
import torch
import torch.multiprocessing as mp

from turbollm.distributed.shm_allreduce import ShmCollectives, create_segment, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="shared-memory collectives: x86 Linux")

SHAPES = [(7,), (3, 64), (300, 33)]  # (300, 33) fp32 takes 4 chunks of a 10 KB slot
SLOT = 10_000


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=g, dtype=dt) for s in SHAPES
            for dt in (torch.float32, torch.bfloat16)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _rank_main(name: str, rank: int, world: int, queue) -> None:
    """Reports plain values (tensors through a queue would need this process alive)."""
    comm = ShmCollectives(name, rank, world, timeout_s=30, slot_bytes=SLOT)
    sums = [comm.all_reduce_(t.clone()) for t in _inputs(rank)]
    per_rank = [_inputs(r) for r in range(world)]
    # torch's sum, in rank order as the collective adds
    wanted = [per_rank[0][i] + per_rank[1][i] for i in range(len(sums))]
    gathered = comm.all_gather(torch.full((2, 3), float(rank)))
    queue.put((rank, [torch.equal(s, w) for s, w in zip(sums, wanted)],
               [_digest(s) for s in sums], [g[0, 0].item() for g in gathered]))
    comm.close()


def test_shm_all_reduce_equals_torch_sum_and_is_the_same_on_every_rank():
    world = 2
    seg = create_segment(world, SLOT)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(seg.name, r, world, queue))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        results = {r: rest for r, *rest in (queue.get(timeout=60) for _ in procs)}
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        seg.close()
        seg.unlink()
    for r in range(world):
        equal, digests, gathered = results[r]
        assert equal == [True] * (2 * len(SHAPES))
        assert digests == results[0][1]  # the same bits on every rank
        assert gathered == [0.0, 1.0]


def test_shm_barrier_times_out_when_a_rank_never_comes():
    seg = create_segment(2, 1024)
    try:
        comm = ShmCollectives(seg.name, 0, 2, timeout_s=0.3, slot_bytes=1024)
        with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):
            comm.all_reduce_(torch.ones(4))
        comm.close()
    finally:
        seg.close()
        seg.unlink()
