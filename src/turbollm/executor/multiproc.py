"""The multi-process executor: tensor x pipeline parallelism over T x P worker processes that
the engine starts itself (torch.multiprocessing's spawn), joined by torch.distributed (gloo on
CPU, NCCL on CUDA).

Who schedules: the engine process, alone. It is the driver: it runs the one scheduler and
sends each plain-data StepBatch, pickled once, down every rank's pipe. With one scheduler
there is nothing to keep in step (no rank can schedule differently from another), and the
engine itself never enters a collective, so it can always watch its workers: a rank that dies
or stops answering is an error here within `distributed_timeout_s`, the others are stopped,
and nothing hangs. (A torchrun launch, one host or several, is executor/torchrun.py: there
rank 0 broadcasts each call over the process group instead of pipes.)

What comes back: the reply rank's (the last stage's first tensor-parallel rank) tokens or
logits, every rank's KV block count (the engine takes the minimum), and per call the seconds
each rank spent in collectives (`comm_stats`).
"""
from __future__ import annotations

import logging
import pickle
import socket
import time
import weakref
from collections import deque
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from turbollm.config import EngineConfig
from turbollm.core.batch import ModelRunnerOutput, StepBatch
from turbollm.distributed.shm_allreduce import create_segment, shm_supported
from turbollm.executor.ranked import RankedExecutor, WorkerProcessError, check_replies
from turbollm.executor.worker_main import run_worker

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # loading a large model on a slow disk
# the engine waits this much longer than the workers' own collective timeout, so that a rank
# stuck on a lost peer reports its timeout before the engine gives up on it
REPLY_GRACE_S = 15.0
# once one rank reported an error, how long the others have to report theirs: ranks run the
# same code on the same batch, so an error every rank meets arrives within this; a rank still
# silent after it waits in a collective for the failed one, and would until its timeout
ERROR_SKEW_S = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs, conns, segments) -> None:
    """Ask every live worker to stop, then terminate / kill the ones that do not; free the
    shared-memory segments. Safe to call twice."""
    for c in conns:
        try:
            c.send_bytes(pickle.dumps(("shutdown", ())))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for c in conns:
        c.close()
    conns.clear()
    for seg in segments:
        try:
            seg.close()
            seg.unlink()
        except FileNotFoundError:
            pass
    segments.clear()


class MultiprocExecutor(RankedExecutor):
    """UniProcExecutor's interface over T x P worker processes (see the module docstring)."""

    def __init__(self, config: EngineConfig):
        pc = config.parallel
        self.config = config
        self.world = pc.world_size
        self.tp, self.pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
        self.reply_rank = self.world - self.tp  # last stage, first tensor-parallel rank
        self.timeout_s = pc.distributed_timeout_s + REPLY_GRACE_S
        self.broken: str | None = None
        # one entry per step sent by submit_execute: None until its replies are taken back
        self._in_flight: deque = deque()
        self._init_comm()
        device = config.device.resolved_device()
        self.segments = []
        use_shm = (pc.parallel_comm != "gloo" and self.tp > 1 and device == "cpu")
        if use_shm and not shm_supported():
            if pc.parallel_comm == "shm":
                raise ValueError("parallel_comm 'shm' needs an x86 Linux host")
            use_shm = False
        if use_shm:  # one segment per pipeline stage's tensor-parallel group
            self.segments = [create_segment(self.tp) for _ in range(self.pp)]
        shm_names = [s.name for s in self.segments] or None
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(self.world):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=run_worker, name=f"turbollm-rank{rank}", daemon=True,
                            args=(rank, config, init_method, shm_names, child))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        # stops the workers when the executor is collected or the interpreter exits
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self.segments)
        self.comm_mode = "shm" if use_shm else ("nccl" if device.startswith("cuda") else "gloo")
        log.info("started %d worker processes (tensor %d x pipeline %d, %s collectives)",
                 self.world, self.tp, self.pp, self.comm_mode)
        self._collect("start", START_TIMEOUT_S)

    # ----- talking to the ranks -----
    def _fail(self, reason: str) -> WorkerProcessError:
        """Stop every worker; later calls raise with the same reason."""
        self.broken = reason
        for p in self.procs:  # the survivors may be inside a collective: no graceful stop
            if p.is_alive():
                p.terminate()
        self._finalizer()
        log.error("%s", reason)
        return WorkerProcessError(reason)

    def _collect(self, what: str, timeout_s: float) -> list:
        """Every rank's reply to the call just sent, watching the processes meanwhile."""
        pending = dict(enumerate(self.conns))
        replies: list = [None] * self.world
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        deadline = time.monotonic() + timeout_s
        first_error = None
        while pending:
            left = deadline - time.monotonic()
            if left <= 0 and first_error is not None:
                return self._raise(self._fail(
                    f"tensor/pipeline rank {first_error[0]} failed in {what!r} and rank(s) "
                    f"{sorted(pending)} did not (they wait in a collective): "
                    f"{first_error[1]}; all worker processes were stopped"))
            if left <= 0:
                return self._raise(self._fail(
                    f"tensor/pipeline rank(s) {sorted(pending)} sent no reply to {what!r} "
                    f"within {timeout_s:.0f}s; all worker processes were stopped"))
            ready = wait(list(pending.values()) + list(sentinels), timeout=left)
            for obj in ready:
                r = next((r for r, c in pending.items() if c is obj), None)
                if r is not None:
                    try:
                        replies[r] = pending[r].recv()
                        del pending[r]
                    except (EOFError, OSError):
                        continue  # its sentinel says why
                    if what == "start" and replies[r][0] == "err":
                        # the others may wait for it in the process group's rendezvous
                        raise self._fail(f"tensor/pipeline rank {r} failed to start: "
                                         f"{replies[r][1]}")
                    if replies[r][0] == "err" and first_error is None:
                        first_error = (r, replies[r][1])
                        deadline = min(deadline, time.monotonic() + ERROR_SKEW_S)
            for obj in ready:
                r = sentinels.get(obj)
                if r is not None and r in pending:
                    self.procs[r].join(1.0)  # its sentinel fired: reap it for its exit code
                    code = self.procs[r].exitcode
                    hint = ""
                    if what == "start":  # the usual cause of a spawned child dying at once
                        hint = (" (workers are spawned: a script that builds the engine must "
                                "guard its top level with `if __name__ == '__main__':`)")
                    return self._raise(self._fail(
                        f"tensor/pipeline rank {r} (pid {self.procs[r].pid}) died with exit "
                        f"code {code} during {what!r}; all worker processes were stopped"
                        f"{hint}"))
        errors = [(r, rep) for r, rep in enumerate(replies) if rep[0] == "err"]
        if errors and what == "start":
            raise self._fail(f"tensor/pipeline rank {errors[0][0]} failed to start: "
                             f"{errors[0][1][1]}")
        message, out_of_step = check_replies(replies, what, self.world)
        if out_of_step:
            raise self._fail(message)
        if message is not None:
            raise RuntimeError(message)
        return replies

    @staticmethod
    def _raise(exc: Exception):
        raise exc

    def _call(self, method: str, *args):
        """Run `method(*args)` on every rank's Worker; the replies, in rank order."""
        self._drain()
        self._send(method, args)
        replies = self._collect(method, self.timeout_s)
        self._count_comm(replies)
        return [rep[1] for rep in replies]

    def _send(self, method: str, args: tuple) -> None:
        if self.broken is not None:
            raise WorkerProcessError(self.broken)
        data = pickle.dumps((method, args))
        for r, c in enumerate(self.conns):
            try:
                c.send_bytes(data)
            except (OSError, ValueError):
                self._collect(method, 1.0)  # reports the dead rank
                raise self._fail(f"tensor/pipeline rank {r} is unreachable")

    # ----- steps in flight (pipeline parallelism) -----
    # Each rank answers its pipe's calls in order, so the engine may send the next step before
    # the last stage has answered the previous one: stage s then works on step i + 1 while
    # stage s + 1 works on step i. Replies are taken back in the order sent; any other call
    # first takes back (and keeps) the replies of the steps still in flight.
    pipelines = True

    def submit_execute(self, batch: StepBatch) -> None:
        """Send a step without waiting for it; collect_execute takes its output back."""
        self._send("execute", (batch,))
        self._in_flight.append(None)

    def collect_execute(self) -> ModelRunnerOutput:
        """The output of the oldest step sent by submit_execute."""
        reply = self._in_flight.popleft()
        if reply is None:
            reply = self._take_step_reply(others=any(r is None for r in self._in_flight))
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _take_step_reply(self, others: bool):
        """The reply rank's output of the oldest step not yet taken back, or the error it
        raised (a failed step while `others` are in flight leaves the stages out of step:
        fatal)."""
        try:
            replies = self._collect("execute", self.timeout_s)
        except WorkerProcessError:
            raise
        except RuntimeError as exc:
            if others:
                return self._fail(f"{exc}; with other steps in flight the stages are out of "
                                  "step, so all worker processes were stopped")
            return exc
        self._count_comm(replies)
        return replies[self.reply_rank][1]

    def _drain(self) -> None:
        """Take back the replies of every step in flight, keeping them for collect_execute."""
        pending = [i for i, reply in enumerate(self._in_flight) if reply is None]
        for k, i in enumerate(pending):
            self._in_flight[i] = self._take_step_reply(others=k + 1 < len(pending))

    def shutdown(self) -> None:
        self._finalizer()
