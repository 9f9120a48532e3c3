"""The in-process executor: one Worker, called directly."""
from __future__ import annotations

from turbollm.config import EngineConfig
from turbollm.core.batch import DraftWork, ModelRunnerOutput, StepBatch
from turbollm.core.lora_request import LoRARequest
from turbollm.worker.worker import ModelInfo, Worker


class UniProcExecutor:
    """Drives one Worker in this process. Every call takes and returns plain data (plus the
    scoring logits tensor), the contract a multi-process executor keeps too."""

    def __init__(self, config: EngineConfig):
        self.worker = Worker(config)

    def model_info(self) -> ModelInfo:
        return self.worker.model_info()

    def num_kv_blocks(self) -> int:
        return self.worker.num_kv_blocks()

    def init_cache(self, num_blocks: int) -> float | None:
        """Allocate the cache and build the runner; the draft's cost per token (or None)."""
        self.worker.init_cache(num_blocks)
        return self.worker.draft_cost_per_token

    def execute(self, batch: StepBatch) -> ModelRunnerOutput:
        return self.worker.execute(batch)

    def add_lora(self, req: LoRARequest, adapter=None, pinned=None) -> None:
        self.worker.add_lora(req, adapter, pinned)

    def loaded_lora_ids(self) -> list[int]:
        return self.worker.loaded_lora_ids()

    def remove_lora(self, lora_id: int) -> bool:
        return self.worker.remove_lora(lora_id)

    def propose(self, work: list[DraftWork]) -> list[list[int]]:
        return self.worker.propose(work)

    def score_logits(self, token_ids: list[int], block_ids: list[int]):
        return self.worker.score_logits(token_ids, block_ids)

    def embed(self, token_ids: list[int], block_ids: list[int], pooling: str) -> list[float]:
        return self.worker.embed(token_ids, block_ids, pooling)

    def comm_stats(self) -> dict:
        """No collectives in one process (see MultiprocExecutor.comm_stats)."""
        return {}

    def last_comm_stats(self) -> dict:
        return {}

    def check_health(self) -> None:
        """Nothing to watch in one process (see TorchrunExecutor.check_health)."""

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig):
    """The executor for `config`: this process for one device, worker processes for tensor /
    pipeline parallelism (executor/multiproc.py), or the ranks of a torchrun launch when this
    process is its rank 0 (executor/torchrun.py)."""
    if config.parallel.launcher == "torchrun":
        from turbollm.executor.torchrun import TorchrunExecutor
        return TorchrunExecutor(config)
    if config.parallel.world_size > 1:
        from turbollm.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config)
    return UniProcExecutor(config)
