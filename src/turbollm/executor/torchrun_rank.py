"""One rank of a torchrun launch: who it is (torchrun's environment), how it joins the
process group and builds its Worker, the wire to rank 0, and the loop every rank but 0 runs.

Wire (executor/torchrun.py is the other end): rank 0 broadcasts each call, pickled, over
`control`, a gloo group of all ranks; every rank runs it on its own Worker
(worker_main.answer) and the replies are gathered to rank 0 over `replies`, another gloo group.
Two groups because they need different timeouts: a rank waits for the next call as long as the
engine stays idle (rank 0 pings it every few seconds then, see TorchrunExecutor.check_health;
the group's timeout only ends a wait on a rank 0 that stopped pinging without dying), while a
reply that takes longer than `distributed_timeout_s` means a rank is lost. Both are gloo even
on CUDA: the calls are Python objects.
"""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from turbollm.config import EngineConfig, default_num_threads
from turbollm.distributed.parallel_state import ParallelState, close_parallel, init_parallel
from turbollm.distributed.shm_allreduce import create_segment, shm_supported
from turbollm.executor.worker_main import answer, bind_cores

log = logging.getLogger(__name__)

# how long a rank waits for rank 0's next call, and for every rank's model to load
CONTROL_TIMEOUT_S = 1800.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the launch, as torchrun's environment variables give it."""

    rank: int
    world_size: int
    local_rank: int  # among the ranks of this host (torchrun's node)
    local_world_size: int  # ranks on this host

    @property
    def one_host(self) -> bool:
        """Every rank on this host: only then may they share memory."""
        return self.local_world_size == self.world_size


def launch_env(environ=None) -> LaunchEnv:
    """Read torchrun's variables; ValueError (one line) when they are missing."""
    environ = os.environ if environ is None else environ
    missing = [k for k in TORCHRUN_ENV if k not in environ]
    if missing:
        raise ValueError(f"not started by torchrun: {', '.join(missing)} not set (launch with "
                         "`torchrun ... -m turbollm.serve ...`, docs/distributed.md)")
    world = int(environ["WORLD_SIZE"])
    # without LOCAL_WORLD_SIZE nothing says who shares this host: assume nobody (gloo, safe)
    return LaunchEnv(int(environ["RANK"]), world, int(environ["LOCAL_RANK"]),
                     int(environ.get("LOCAL_WORLD_SIZE", "1")))


def check_world(config: EngineConfig, env: LaunchEnv) -> None:
    """The launch must have exactly T x P ranks."""
    pc = config.parallel
    if pc.world_size != env.world_size:
        raise ValueError(
            f"torchrun started {env.world_size} ranks but --tensor-parallel-size "
            f"{pc.tensor_parallel_size} x --pipeline-parallel-size "
            f"{pc.pipeline_parallel_size} = {pc.world_size}: they must be equal")


def use_shared_memory(config: EngineConfig, env: LaunchEnv, device: str) -> bool:
    """Shared-memory all-reduce only where every rank is on this host (LOCAL_WORLD_SIZE ==
    WORLD_SIZE); across hosts, gloo. parallel_comm=shm that cannot be honoured is an error."""
    pc = config.parallel
    if pc.tensor_parallel_size == 1 or device != "cpu" or pc.parallel_comm == "gloo":
        return False
    ok = env.one_host and shm_supported()
    if pc.parallel_comm == "shm" and not ok:
        raise ValueError("parallel_comm 'shm' needs every rank on one x86 Linux host "
                         f"(this launch has {env.local_world_size} of {env.world_size} ranks "
                         "here)")
    return ok


@dataclass
class RankContext:
    """What a joined rank holds: its groups, its Worker, and (rank 0) the segments to free."""

    env: LaunchEnv
    device: str
    comm_mode: str  # shm / gloo / nccl: the tensor-parallel collectives
    control: object  # gloo group: calls, rank 0 -> all
    replies: object  # gloo group: replies, all -> rank 0
    ps: ParallelState | None = None
    worker: object = None
    segments: list = field(default_factory=list)


def _rank_device(config: EngineConfig, env: LaunchEnv) -> str:
    """This rank's device: its host's GPU LOCAL_RANK, or on CPU its share of the host's cores
    (the calling thread pinned to them; sets cpu_threads_per_worker in this rank's config)."""
    device = config.device.resolved_device()
    if device.startswith("cuda"):  # one GPU per rank of a host (untested: no multi-GPU here)
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if device == "cpu":
        # counted before pinning (afterwards this thread sees only its cores); the cores of
        # this host are shared by its ranks, not by the launch's
        pc = config.parallel
        pc.cpu_threads_per_worker = (pc.cpu_threads_per_worker or
                                     max(1, default_num_threads() // env.local_world_size))
        bind_cores(env.local_rank, env.local_world_size, pc.cpu_threads_per_worker)
    return device


def join_ranks(config: EngineConfig, env: LaunchEnv) -> RankContext:
    """Join the launch's process group (torchrun's MASTER_ADDR:MASTER_PORT), create the control
    and reply groups and this rank's tensor/pipeline groups; rank 0 creates the shared-memory
    segments, when the ranks share a host, and tells the others their names."""
    pc = config.parallel
    device = _rank_device(config, env)
    shm = use_shared_memory(config, env, device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=env.rank,
                            world_size=env.world_size,
                            timeout=timedelta(seconds=pc.distributed_timeout_s))
    # every rank creates the same groups in the same order (torch.distributed's rule)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    replies = dist.new_group(backend="gloo",
                             timeout=timedelta(seconds=pc.distributed_timeout_s))
    segments = []
    names = [None]
    if shm:
        if env.rank == 0:
            segments = [create_segment(pc.tensor_parallel_size)
                        for _ in range(pc.pipeline_parallel_size)]
            names = [[s.name for s in segments]]
        dist.broadcast_object_list(names, src=0, group=control)
    ps = init_parallel(env.rank, pc.tensor_parallel_size, pc.pipeline_parallel_size, None,
                       device, pc.distributed_timeout_s, names[0])
    mode = "shm" if shm else backend
    return RankContext(env, device, mode, control, replies, ps, segments=segments)


def build_worker(config: EngineConfig, ctx: RankContext) -> list | None:
    """Build this rank's Worker (its slice of the model) and gather every rank's outcome to
    rank 0, over `control` (ranks may load for long at different speeds): rank 0 gets the
    replies in rank order, the others None."""
    from turbollm.worker.worker import Worker
    try:
        ctx.worker = Worker(config, ctx.ps, ctx.device)
        reply = ("ok", None, (0.0, 0.0))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which decides
        traceback.print_exc()  # the whole story on this rank's stderr; one line to rank 0
        reply = ("err", f"{type(exc).__name__}: {exc}", False)
    return gather_replies(ctx, reply, ctx.control)


def send_call(ctx: RankContext, method: str, args: tuple) -> None:
    """Rank 0: every rank is to run `method(*args)`."""
    dist.broadcast_object_list([(method, args)], src=0, group=ctx.control)


def receive_call(ctx: RankContext) -> tuple:
    """Ranks but 0: wait for rank 0's next call."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def gather_replies(ctx: RankContext, reply: tuple, group=None) -> list | None:
    """Every rank's reply, in rank order, on rank 0 (None elsewhere)."""
    out = [None] * ctx.env.world_size if ctx.env.rank == 0 else None
    dist.gather_object(reply, out, dst=0, group=group or ctx.replies)
    return out


def serve_rank(config: EngineConfig, env: LaunchEnv) -> int:
    """A rank other than 0: join, load this rank's slice, then run rank 0's calls until it says
    "shutdown" (exit code 0) or is lost (1). Returns the exit code; the caller should leave with
    os._exit, since torch's threads and a broken gloo group can hang interpreter teardown."""
    ctx = join_ranks(config, env)
    build_worker(config, ctx)
    if ctx.worker is None:
        return 1  # rank 0 reports it and stops the launch
    # on the error paths below the group is broken: leave without tearing it down (that can
    # hang waiting on the lost rank)
    while True:
        try:
            method, args = receive_call(ctx)
        except Exception as exc:  # noqa: BLE001 - rank 0 died or its host went away
            log.error("rank %d: lost rank 0 while waiting for a call (%s: %s); exiting",
                      env.rank, type(exc).__name__, exc)
            return 1
        if method == "shutdown":
            close_parallel(ctx.ps)
            return 0
        reply = answer(ctx.worker, ctx.ps, method, args)
        try:
            gather_replies(ctx, reply)
        except Exception as exc:  # noqa: BLE001
            log.error("rank %d: could not reply to rank 0 (%s: %s); exiting", env.rank,
                      type(exc).__name__, exc)
            return 1
