"""Who this process is in a tensor x pipeline grid, and its collectives.

Global rank = pp_rank * tp_size + tp_rank: the ranks of one pipeline stage are consecutive,
so a stage's tensor-parallel group shares a host (and a shared-memory segment) first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from turbollm.distributed.shm_allreduce import ShmCollectives, native_abi
from turbollm.model_arch import ModelArch
from turbollm.native_build import function_address


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, head_layers: float = 0.0
                 ) -> tuple[int, int]:
    """[start, end) of the decoder layers of stage `pp_rank`: contiguous, earlier stages taking
    the remainder. The last stage also runs the norm and LM head, worth `head_layers` layers
    of work: it takes that many fewer (rounded), so that the stages of pipelined steps take
    about equal times (the slowest one sets the pace)."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} "
                         "layers")
    last = num_layers // pp_size
    if pp_size > 1 and head_layers:
        last = min(max(1, round((num_layers + head_layers) / pp_size - head_layers)),
                   num_layers - (pp_size - 1))
    if pp_rank == pp_size - 1:  # (one stage: all layers)
        return num_layers - last, num_layers
    base, extra = divmod(num_layers - last, pp_size - 1)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def head_split(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int
               ) -> tuple[int, int, int]:
    """(local query heads, first KV head, local KV heads) of a tensor-parallel rank.

    Query heads split evenly. KV heads split evenly when there are at least as many as ranks;
    with fewer, each rank keeps (a replica of) the one KV head its query heads read, which
    needs tp_size to be a multiple of the KV heads."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's {num_heads} "
                         "attention heads")
    heads = num_heads // tp_size
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's "
                             f"{num_kv_heads} KV heads")
        kv = num_kv_heads // tp_size
        return heads, tp_rank * kv, kv
    if tp_size % num_kv_heads:
        raise ValueError(f"with {num_kv_heads} KV heads (fewer than {tp_size} ranks), "
                         f"tensor_parallel_size must be a multiple of {num_kv_heads}")
    group = num_heads // num_kv_heads  # query heads per KV head
    return heads, tp_rank * heads // group, 1


def rank_arch(arch: ModelArch, tp_size: int, tp_rank: int, num_layers: int) -> ModelArch:
    """The shapes one rank's KV cache holds (its stage's `num_layers` layers, its query and KV
    heads), for the one sizing function; the planner's per-GPU KV bytes agree with it."""
    heads, _, kv = head_split(arch.num_attention_heads, arch.num_key_value_heads, tp_size,
                              tp_rank)
    return replace(arch, num_hidden_layers=num_layers, num_attention_heads=heads,
                   num_key_value_heads=kv)


def vocab_split(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first row, rows) of the vocabulary a rank holds: ceil(V / T) rows each, the last rank's
    shard padded past V with rows no token reaches (their logits are cut off after gather)."""
    per = -(-vocab_size // tp_size)
    return tp_rank * per, per


@dataclass
class CommCounters:
    """Seconds spent in collectives since start: tensor-parallel all-reduce/all-gather (the
    wait for the slowest rank included), and pipeline receives (the wait for the previous
    stage's compute included: under sequential micro-batches that is the pipeline bubble)."""

    tp_seconds: float = 0.0
    tp_calls: int = 0
    pp_seconds: float = 0.0
    pp_calls: int = 0


class TPGroup:
    """Collectives among the tensor-parallel ranks of one pipeline stage: shared memory when
    the ranks share a CPU host, else torch.distributed (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, size: int, rank: int, group, shm: ShmCollectives | None,
                 counters: CommCounters):
        self.size, self.rank, self.group, self.shm = size, rank, group, shm
        self.counters = counters

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        t0 = time.perf_counter()
        if self.shm is not None and t.device.type == "cpu" and t.is_contiguous():
            self.shm.all_reduce_(t)
        else:
            dist.all_reduce(t, group=self.group)
        c = self.counters
        c.tp_seconds += time.perf_counter() - t0
        c.tp_calls += 1
        return t

    def native_all_reduce(self) -> tuple[int, torch.Tensor] | None:
        """(address of the C all-reduce, its context words) for the C decode loop, or None
        where this group's collectives are not shared memory."""
        if self.shm is None or self.shm.native is None:
            return None
        fn, ctx = self.shm.native
        return function_address(fn), ctx

    def run_native(self, call) -> None:
        """call() (C code that all-reduces through native_all_reduce), then raise if a rank did
        not arrive, and count the time and calls it spent in the all-reduce."""
        abi = native_abi()
        ctx = self.shm.native[1]
        ns, calls = int(ctx[abi.AR_NS]), int(ctx[abi.AR_CALLS])
        call()
        self.shm.check_native()
        c = self.counters
        c.tp_seconds += (int(ctx[abi.AR_NS]) - ns) / 1e9
        c.tp_calls += int(ctx[abi.AR_CALLS]) - calls

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t concatenated along the last dimension, in rank order."""
        t0 = time.perf_counter()
        if self.shm is not None and t.device.type == "cpu" and self.shm.fits(t):
            parts = self.shm.all_gather(t)
        else:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
        out = torch.cat(parts, dim=-1)
        c = self.counters
        c.tp_seconds += time.perf_counter() - t0
        c.tp_calls += 1
        return out


@dataclass
class ParallelState:
    """This process's place in the grid, and its groups (None: a size-1 dimension)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    tp: TPGroup | None = None
    counters: CommCounters = field(default_factory=CommCounters)
    _sending: tuple | None = None  # (the last send_next's work, its tensor kept alive)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_reply_rank(self) -> bool:
        """The rank whose sampled tokens and logits the engine takes: the last stage's first
        tensor-parallel rank (every tensor-parallel rank computes the same ones)."""
        return self.is_last_stage and self.tp_rank == 0

    def send_next(self, t: torch.Tensor) -> None:
        """Hidden states to the same tensor-parallel rank of the next stage. Sent without
        waiting for the next stage to take them (it may still be on the previous step, with
        pipelined steps): this stage goes on to its next step meanwhile, and waits for the
        send only before its next one."""
        if self._sending is not None:
            self._sending[0].wait()
        t = t.contiguous()
        self._sending = (dist.isend(t, dst=self.rank + self.tp_size), t)

    def recv_prev(self, shape, dtype, device) -> torch.Tensor:
        """Hidden states from the same tensor-parallel rank of the previous stage."""
        t0 = time.perf_counter()
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=self.rank - self.tp_size)
        self.counters.pp_seconds += time.perf_counter() - t0
        self.counters.pp_calls += 1
        return t


def init_parallel(rank: int, tp_size: int, pp_size: int, init_method: str | None,
                  device: str, timeout_s: float, shm_names: list[str] | None) -> ParallelState:
    """Join the process group (gloo on CPU, NCCL on CUDA; `timeout_s` bounds every collective,
    so a lost rank is an error, not a hang) and build this rank's groups. Every rank creates
    every stage's group, in the same order, as torch.distributed requires. A process that
    joined already (a torchrun rank, which needs the group before it knows the shared-memory
    names) passes init_method=None."""
    world = tp_size * pp_size
    if init_method is not None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    pp_rank, tp_rank = divmod(rank, tp_size)
    state = ParallelState(rank, world, tp_rank, tp_size, pp_rank, pp_size)
    if tp_size > 1:
        mine = None
        for stage in range(pp_size):
            g = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if stage == pp_rank:
                mine = g
        shm = None
        if shm_names and not device.startswith("cuda"):
            shm = ShmCollectives(shm_names[pp_rank], tp_rank, tp_size, timeout_s)
        state.tp = TPGroup(tp_size, tp_rank, mine, shm, state.counters)
    return state


def close_parallel(state: ParallelState | None) -> None:
    if state is not None and state.tp is not None and state.tp.shm is not None:
        state.tp.shm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
