"""A shared-memory all-reduce / all-gather for the ranks of one host.

Why not gloo: gloo's all-reduce goes through TCP on loopback, tens of microseconds per call
and a copy through the kernel; a decode step makes two per layer. Here every rank copies its
tensor into its own slot of one shared buffer, waits at a barrier, and reads the others' slots
(the idea of vLLM's and SGLang's CPU communicators, written here from scratch).

Layout of the segment (created by the engine, attached by each rank):
    [flags: world x 64 bytes][set 0: world slots][set 1: world slots]
Each rank's flag is an int64 counter on its own cache line (no false sharing). Operation i
uses slot set i % 2, so one barrier per operation suffices: a rank can only start writing set
i % 2 again (operation i + 2) after every rank passed the barrier of operation i + 1, which
they reach only after reading operation i's slots.

Determinism: every rank sums the slots in rank order 0, 1, ..., so all ranks get the same bits,
and the same bits from one run to the next.

Memory ordering: x86 keeps stores in order (TSO), so a rank that sees a peer's counter see its
slot data too. Other CPUs would need fences; this class is used on x86 hosts only (see
`shm_supported`).

fp32 all-reduces run in C (csrc/shm_collectives.c: the same protocol and bits, and the one the
C decode loop calls between its layers' projections); the operation count is each rank's own
flag, so the Python and C sides can take turns.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

from turbollm.native_build import I64, PTR, load_library, read_abi

FLAG_BYTES = 64
DEFAULT_SLOT_BYTES = 8 * 2**20  # per rank and per set: 8 MiB holds [2048, 1024] fp32 rows


def shm_supported() -> bool:
    """Shared-memory collectives need in-order stores (x86) and /dev/shm (Linux)."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def segment_bytes(world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> int:
    return world_size * FLAG_BYTES + 2 * world_size * slot_bytes


def create_segment(world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES
                   ) -> shared_memory.SharedMemory:
    """The zeroed segment for one group (the creator unlinks it when the group is done)."""
    shm = shared_memory.SharedMemory(create=True, size=segment_bytes(world_size, slot_bytes))
    shm.buf[:world_size * FLAG_BYTES] = bytes(world_size * FLAG_BYTES)
    return shm


@functools.cache
def _native():
    """(the C library, its AR_* word indexes), or None where it cannot be built or run."""
    lib = load_library(Path(__file__).parent / "csrc" / "shm_collectives.c",
                       {"shm_all_reduce_f32": [PTR, PTR, I64]})
    return None if lib is None else (lib, read_abi(lib, "shm_abi"))


def native_abi():
    """The AR_* word indexes of the C all-reduce's context (csrc/decode_abi.h)."""
    return _native()[1]


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to the engine's segment. The worker processes are spawned by the engine and share
    its resource tracker, which already knows the segment (a set: no second entry), so the
    engine's unlink is the one cleanup; a rank exiting does not remove it from the others."""
    return shared_memory.SharedMemory(name=name)


class ShmCollectives:
    """all_reduce (sum) and all_gather over a shared segment; see the module docstring."""

    def __init__(self, name: str, rank: int, world_size: int, timeout_s: float,
                 slot_bytes: int = DEFAULT_SLOT_BYTES):
        self.rank, self.world, self.timeout_s = rank, world_size, timeout_s
        self.slot_bytes = slot_bytes
        self.shm = _attach(name)
        self._flags = np.ndarray((world_size, FLAG_BYTES // 8), dtype=np.int64,
                                 buffer=self.shm.buf)
        data = torch.frombuffer(self.shm.buf, dtype=torch.uint8,
                                offset=world_size * FLAG_BYTES,
                                count=2 * world_size * slot_bytes)
        # slots[set][rank]: [slot_bytes] uint8 views
        self.slots = data.view(2, world_size, slot_bytes)
        self.native = self._native_context(timeout_s)

    def _native_context(self, timeout_s: float):
        """(the C all-reduce function, its context words: csrc/decode_abi.h AR_*) or None."""
        if _native() is None:
            return None
        lib, abi = _native()
        ctx = torch.zeros(abi.AR_WORDS, dtype=torch.int64)
        slots = self.slots.data_ptr()  # the flags come first in the segment
        ctx[abi.AR_FLAGS], ctx[abi.AR_SLOTS] = slots - self.world * FLAG_BYTES, slots
        ctx[abi.AR_RANK], ctx[abi.AR_WORLD] = self.rank, self.world
        ctx[abi.AR_SLOT_BYTES] = self.slot_bytes
        ctx[abi.AR_TIMEOUT_NS] = int(timeout_s * 1e9)
        assert FLAG_BYTES == 8 * abi.AR_FLAG_STRIDE
        return lib.shm_all_reduce_f32, ctx

    @property
    def op(self) -> int:
        """Operations done by this rank: its own flag (the C side advances it too)."""
        return int(self._flags[self.rank, 0])

    def check_native(self) -> None:
        """Raise if a C all-reduce timed out (a rank did not arrive)."""
        failed = int(self.native[1][native_abi().AR_FAILED])
        if failed:
            raise self._timeout(failed)

    def _timeout(self, target: int) -> TimeoutError:
        """The error for an operation (count `target`) that some ranks never reached."""
        flags = self._flags[:, 0]
        late = [r for r in range(self.world) if flags[r] < target]
        return TimeoutError(f"shared-memory collective: rank(s) {late} did not arrive within "
                            f"{self.timeout_s:.0f}s")

    def close(self) -> None:
        self.slots = self._flags = self.native = None
        self.shm.close()

    def _barrier(self) -> None:
        """Publish this rank's operation count; wait until every rank published it."""
        flags = self._flags
        target = int(flags[self.rank, 0]) + 1
        flags[self.rank, 0] = target
        col = flags[:, 0]
        spins = 0
        deadline = None
        while col.min() < target:
            spins += 1
            if spins & 63 == 0:
                # yield: ranks may share cores (2-core machines run 2 ranks + the engine)
                os.sched_yield()
                if spins & 4095 == 0:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.timeout_s
                    elif now > deadline:
                        raise self._timeout(target)

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.slot_bytes

    def _publish(self, flat: torch.Tensor) -> torch.Tensor:
        """Copy this rank's flat tensor into its slot of the current set and wait for the
        others; the current set's slots as [world, slot_bytes] uint8."""
        cur = self.slots[self.op % 2]
        n = flat.numel() * flat.element_size()
        cur[self.rank, :n].copy_(flat.view(torch.uint8))
        self._barrier()
        return cur

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """t <- sum over ranks of t, in place (t contiguous, on CPU); summed in rank order."""
        if t.dtype == torch.float32 and self.native is not None:
            fn, ctx = self.native
            fn(ctx.data_ptr(), t.data_ptr(), t.numel())
            self.check_native()
            return t
        flat = t.view(-1)
        per = self.slot_bytes // t.element_size()
        for a in range(0, flat.numel(), per):
            part = flat[a:a + per]
            n = part.numel() * part.element_size()
            cur = self._publish(part)
            part.copy_(cur[0, :n].view(t.dtype))
            for r in range(1, self.world):
                part.add_(cur[r, :n].view(t.dtype))
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (same shape on each; must fit one slot), in rank order."""
        flat = t.contiguous().view(-1)
        n = flat.numel() * flat.element_size()
        cur = self._publish(flat)
        return [cur[r, :n].view(t.dtype).view(t.shape).clone() for r in range(self.world)]

