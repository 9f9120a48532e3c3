"""The torchrun executor: rank 0 of a `torchrun ... -m turbollm.serve` launch (one host or
several), driving every rank over the launch's process group.

Who schedules: rank 0, alone, as with the spawned workers (executor/multiproc.py). It holds
the engine and the one scheduler, and is itself a worker rank: each call (a StepBatch, the KV
block count, a health ping, shutdown) is pickled once and broadcast to every rank; each runs it
on its own Worker (rank 0 too, in the engine's thread) and the replies are gathered back to
rank 0 (executor/torchrun_rank.py has the wire and the other ranks' loop). Broadcasting one
schedule rather than running the same deterministic scheduler on every rank keeps the ranks in
step by construction: requests, aborts and arrival times exist on rank 0 only.

Failure: rank 0 sits inside the collectives itself, so it cannot watch processes as the
spawning executor does. A rank that dies closes its connections, and rank 0's next broadcast,
collective or gather fails at once; a rank that hangs makes the gather time out after
`distributed_timeout_s`. The idle engine pings the ranks every few seconds (`check_health`), so
a rank lost between requests is noticed too. Either way the executor is broken from then on
(the server goes not-ready and exits) and the surviving ranks exit when they lose rank 0.
"""
from __future__ import annotations

import logging
import time
import weakref

from turbollm.config import EngineConfig
from turbollm.executor.ranked import RankedExecutor, WorkerProcessError, check_replies
from turbollm.executor.torchrun_rank import (RankContext, build_worker, check_world,
                                             gather_replies, join_ranks, launch_env,
                                             send_call)
from turbollm.executor.worker_main import answer

log = logging.getLogger(__name__)

HEARTBEAT_MAX_S = 5.0  # the idle engine pings the ranks at least this often


def _goodbye(ctx: RankContext, state: dict) -> None:
    """Tell the other ranks to exit (unless the group is broken), free the segments. Runs once:
    at shutdown(), when the executor is collected, or at interpreter exit."""
    if state["broken"] is None:
        try:
            send_call(ctx, "shutdown", ())
        except Exception:  # noqa: BLE001 - they exit on their own when rank 0 goes
            pass
    for seg in ctx.segments:
        try:
            seg.close()
            seg.unlink()
        except FileNotFoundError:
            pass


class TorchrunExecutor(RankedExecutor):
    """UniProcExecutor's interface over the ranks of a torchrun launch; this process must be
    rank 0 (see the module docstring)."""

    def __init__(self, config: EngineConfig, environ=None):
        env = launch_env(environ)
        check_world(config, env)
        if env.rank != 0:
            raise RuntimeError(f"rank {env.rank} builds no engine: only rank 0 does "
                               "(`python -m turbollm.serve` runs the other ranks' loop)")
        pc = config.parallel
        self.tp, self.pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
        self.world = env.world_size
        self.reply_rank = self.world - self.tp  # last stage, first tensor-parallel rank
        self.heartbeat_s = min(HEARTBEAT_MAX_S, pc.distributed_timeout_s / 4)
        self._init_comm()
        self._state = {"broken": None}
        self.ctx = join_ranks(config, env)
        self.comm_mode = f"{self.ctx.comm_mode}, torchrun"
        self._finalizer = weakref.finalize(self, _goodbye, self.ctx, self._state)
        log.info("torchrun rank 0 of %d (tensor %d x pipeline %d, %s collectives, %s)",
                 self.world, self.tp, self.pp, self.ctx.comm_mode,
                 "one host" if env.one_host else f"{env.local_world_size} rank(s) on this host")
        replies = build_worker(config, self.ctx)
        failed = [(r, rep[1]) for r, rep in enumerate(replies) if rep[0] == "err"]
        if failed:
            self._finalizer()  # the ones that loaded wait for a call: tell them to exit
            raise WorkerProcessError(f"tensor/pipeline rank {failed[0][0]} failed to start: "
                                     f"{failed[0][1]}")
        self._last_call = time.monotonic()

    @property
    def broken(self) -> str | None:
        return self._state["broken"]

    def _fail(self, reason: str) -> WorkerProcessError:
        """From now on every call raises `reason`; the other ranks exit when they find rank 0
        gone (no goodbye: the group is unusable)."""
        self._state["broken"] = reason
        self._finalizer()
        log.error("%s", reason)
        return WorkerProcessError(reason)

    def _call(self, method: str, *args) -> list:
        """Run `method(*args)` on every rank's Worker; the results, in rank order."""
        if self.broken is not None:
            raise WorkerProcessError(self.broken)
        self._last_call = time.monotonic()
        try:
            send_call(self.ctx, method, args)
        except Exception as exc:  # noqa: BLE001 - a lost rank breaks the broadcast
            raise self._fail(f"a tensor/pipeline rank is unreachable (died, or its host is "
                             f"gone) at {method!r}: {type(exc).__name__}: {exc}") from None
        mine = answer(self.ctx.worker, self.ctx.ps, method, args)
        try:
            replies = gather_replies(self.ctx, mine)
        except Exception as exc:  # noqa: BLE001
            own = f"; rank 0's own error: {mine[1]}" if mine[0] == "err" else ""
            raise self._fail(f"a tensor/pipeline rank sent no reply to {method!r} (died, hung "
                             f"past distributed_timeout_s, or its host is gone): "
                             f"{type(exc).__name__}: {exc}{own}") from None
        message, out_of_step = check_replies(replies, method, self.world)
        if out_of_step:
            raise self._fail(message)
        if message is not None:
            raise RuntimeError(message)
        self._count_comm(replies)
        return [rep[1] for rep in replies]

    def check_health(self) -> None:
        """Ping every rank when nothing was sent for `heartbeat_s` (cheap: a broadcast and a
        gather); raises WorkerProcessError once a rank is lost. Also keeps the other ranks'
        wait for the next call short of its timeout."""
        if self.broken is not None:
            raise WorkerProcessError(self.broken)
        if time.monotonic() - self._last_call >= self.heartbeat_s:
            self._call("ping")

    def shutdown(self) -> None:
        self._finalizer()
