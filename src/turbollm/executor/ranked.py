"""The executor interface over tensor x pipeline ranks, whatever carries the calls to them.

MultiprocExecutor (pipes to spawned children) and TorchrunExecutor (the process group of a
torchrun launch) differ only in how one call reaches every rank and how the replies come back
(`_call`); what each engine call asks of the ranks, and the communication-time counters, are
the same and live here.
"""
from __future__ import annotations

from turbollm.core.batch import DraftWork, ModelRunnerOutput, StepBatch
from turbollm.core.lora_request import LoRARequest
from turbollm.worker.worker import ModelInfo


class WorkerProcessError(RuntimeError):
    """A rank died, failed to start, or stopped answering; the ranks are stopped."""


def check_replies(replies: list, what: str, world: int):
    """The ranks' replies to one call, ("ok", result, comm) or ("err", message, timed_out)
    each: None when all succeeded; the error to raise otherwise, and whether the ranks are out
    of step (then no later call can be trusted and the caller stops them all)."""
    errors = [(r, rep) for r, rep in enumerate(replies) if rep[0] == "err"]
    if not errors:
        return None, False
    r, rep = errors[0]
    if len(errors) < world or any(e[1][2] for e in errors):
        # some ranks failed and others did not, or a collective timed out: the ranks may have
        # left a collective half done
        return (f"tensor/pipeline rank {r} failed in {what!r} and the ranks are out of step: "
                f"{rep[1]}"), True
    return f"{rep[1]} (in every tensor/pipeline rank)", False


class RankedExecutor:
    """UniProcExecutor's interface over T x P ranks; subclasses define `_call(method, *args)`
    (every rank runs `method(*args)` on its Worker; the results in rank order) and set
    `tp`, `pp`, `world`, `reply_rank` and `comm_mode`."""

    tp: int
    pp: int
    world: int
    reply_rank: int  # the last stage's first tensor-parallel rank
    comm_mode: str
    # whether steps can be sent before the previous one's output is back (submit_execute /
    # collect_execute: MultiprocExecutor)
    pipelines = False

    def _init_comm(self) -> None:
        self.comm = {"tp_comm_seconds": 0.0, "pp_wait_seconds": 0.0, "parallel_calls": 0}
        self.last_comm = {"tp_comm_seconds": 0.0, "pp_wait_seconds": 0.0}

    def _count_comm(self, replies: list) -> None:
        """Add the slowest rank's collective seconds of one call (replies carry (tp, pp))."""
        tp = max(rep[2][0] for rep in replies)
        pp = max(rep[2][1] for rep in replies)
        self.last_comm = {"tp_comm_seconds": tp, "pp_wait_seconds": pp}
        self.comm["tp_comm_seconds"] += tp
        self.comm["pp_wait_seconds"] += pp
        self.comm["parallel_calls"] += 1

    def _call(self, method: str, *args) -> list:
        raise NotImplementedError

    def _reply(self, method: str, *args):
        return self._call(method, *args)[self.reply_rank]

    def model_info(self) -> ModelInfo:
        info = self._reply("model_info")
        info.system["parallel"] = f"tp={self.tp} pp={self.pp} ({self.comm_mode})"
        return info

    def num_kv_blocks(self) -> int:
        # every rank replies (worker_main.ALL_RANKS_REPLY): the smallest cache bounds them all
        return min(self._call("num_kv_blocks"))

    def init_cache(self, num_blocks: int) -> float | None:
        self._call("init_cache", num_blocks)
        return None  # no draft model under parallelism (config refuses it)

    def execute(self, batch: StepBatch) -> ModelRunnerOutput:
        return self._reply("execute", batch)

    def score_logits(self, token_ids: list[int], block_ids: list[int]):
        return self._reply("score_logits", token_ids, block_ids)

    def embed(self, token_ids: list[int], block_ids: list[int], pooling: str) -> list[float]:
        return self._reply("embed", token_ids, block_ids, pooling)

    def add_lora(self, req: LoRARequest, adapter=None, pinned=None) -> None:
        raise ValueError("LoRA adapters are not supported with tensor/pipeline parallelism yet")

    def loaded_lora_ids(self) -> list[int]:
        return []

    def remove_lora(self, lora_id: int) -> bool:
        return False

    def propose(self, work: list[DraftWork]) -> list[list[int]]:
        raise RuntimeError("draft-model speculation is not supported with tensor/pipeline "
                           "parallelism yet")

    def linear_methods(self) -> list[dict[str, str]]:
        """Each rank's {linear layer: QuantMethod name}, in rank order."""
        return self._call("linear_methods")

    def native_decode_runs(self) -> list[dict[str, int]]:
        """Each rank's steps in the native decoder's C and Python loops, in rank order."""
        return self._call("native_decode_runs")

    def comm_stats(self) -> dict:
        """Seconds in tensor-parallel collectives and pipeline receives since start (the
        slowest rank's per call, summed), and the calls counted."""
        return dict(self.comm)

    def last_comm_stats(self) -> dict:
        """The same seconds, for the last call alone (the engine sums them per step)."""
        return dict(self.last_comm)

    def check_health(self) -> None:
        """Called by the idle engine loop; raises when a rank is known to be lost."""
