"""The body of one worker process of the multi-process executor (executor/multiproc.py).

Joins the process group, builds this rank's Worker (its slice of the model and its KV cache),
then serves the engine's calls from its pipe until told to stop or the engine goes away.
Every call reaches every rank (the engine writes the same pickled call to each pipe), so all
ranks run the same steps in the same order and meet in the same collectives.
"""
from __future__ import annotations

import os
import pickle
import traceback

# the methods whose result every rank sends back (num_kv_blocks: the engine takes the minimum;
# linear_methods, native_decode_runs: each rank's own); for the rest only the reply rank's result is sent (the
# others' would be the same, or empty)
ALL_RANKS_REPLY = {"num_kv_blocks", "linear_methods", "native_decode_runs"}


def bind_cores(rank: int, world: int, threads: int) -> list[int] | None:
    """Pin this rank to its own `threads` cores of the ones the engine may use (rank r: the
    r-th group), so ranks neither share nor migrate between cores; None (no pinning) when the
    groups do not fit."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    if world * threads > len(allowed):
        return None
    mine = allowed[rank * threads:(rank + 1) * threads]
    os.sched_setaffinity(0, mine)
    return mine


def _snapshot(ps) -> tuple[float, float]:
    c = ps.counters
    return c.tp_seconds, c.pp_seconds


def answer(worker, ps, method: str, args: tuple) -> tuple:
    """Run one engine call on this rank's Worker: ("ok", result, (tp seconds, pp seconds) in
    collectives during it) or ("err", one-line message, whether it looks like a timeout).
    "ping" touches nothing (the executor's health check). The result is sent only by the
    reply rank (and, for ALL_RANKS_REPLY, by every rank): the others' would be the same."""
    if method == "ping":
        return ("ok", None, (0.0, 0.0))
    before = _snapshot(ps)
    try:
        result = getattr(worker, method)(*args)
        if not (ps.is_reply_rank or method in ALL_RANKS_REPLY):
            result = None
        after = _snapshot(ps)
        return ("ok", result, (after[0] - before[0], after[1] - before[1]))
    except Exception as exc:  # noqa: BLE001 - the engine decides what it means
        timed_out = isinstance(exc, TimeoutError) or "timed out" in str(exc).lower()
        return ("err", f"{type(exc).__name__}: {exc}", timed_out)


def run_worker(rank: int, config, init_method: str, shm_names: list[str] | None, conn) -> None:
    """Entry point of a spawned worker process (see the module docstring)."""
    import torch

    from turbollm.distributed.parallel_state import close_parallel, init_parallel
    from turbollm.worker.worker import Worker

    pc = config.parallel
    ps = None
    try:
        device = config.device.resolved_device()
        if device.startswith("cuda"):  # one GPU per rank (untested here: no GPU on CI)
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        if device == "cpu":
            # counted before pinning: afterwards this process sees only its own cores (this
            # config is the rank's own unpickled copy)
            pc.cpu_threads_per_worker = pc.threads_per_worker()
            bind_cores(rank, pc.world_size, pc.cpu_threads_per_worker)
        ps = init_parallel(rank, pc.tensor_parallel_size, pc.pipeline_parallel_size,
                           init_method, device, pc.distributed_timeout_s, shm_names)
        worker = Worker(config, ps, device)
        conn.send(("ok", None, (0.0, 0.0)))
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, then exit
        traceback.print_exc()  # the whole story on this rank's stderr; one line to the engine
        conn.send(("err", f"{type(exc).__name__}: {exc}", False))
        close_parallel(ps)
        return
    try:
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break  # the engine is gone
            if method == "shutdown":
                break
            conn.send(answer(worker, ps, method, args))
    finally:
        close_parallel(ps)
        os._exit(0)  # skip interpreter teardown: torch's threads and gloo can hang it
