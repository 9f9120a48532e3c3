"""Worker: owns every tensor of an engine — the model, any draft, the KV cache — on one device.

Its life, as the executor drives it (nano-vllm's ModelRunner.__init__ order):
construct (device, threads, seed; load the model and any draft) -> `model_info()` ->
`num_kv_blocks()` (measure, then size) -> `init_cache(num_blocks)` (allocate, build the
runner and the draft proposer, calibrate AWQ/GPTQ) -> `execute(batch)` per step.
Everything it takes and gives back through these calls is plain data (core/batch.py), so an
executor can run it in another process.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from turbollm.attention.selector import get_attention_backend
from turbollm.config import EngineConfig, default_num_threads
from turbollm.core.batch import DraftWork, ModelRunnerOutput, StepBatch
from turbollm.core.lora_request import LoRARequest
from turbollm.layers import prefill_gemm
from turbollm.loader.peft_adapter import PeftAdapter
from turbollm.model_arch import ModelArch
from turbollm.native_build import select_isa
from turbollm.quantization import kernels as quant_kernels
from turbollm.worker.draft import build_draft_proposer, draft_kv_share, load_separate_draft
from turbollm.worker.kv_cache import (allocate_kv_cache, blocks_for_budget, kv_budget_bytes,
                                      profile_peak_bytes)
from turbollm.worker.model_loader import load_model, multi_row_products_in_bf16
from turbollm.worker.model_runner import ModelRunner
from turbollm.worker.system_info import format_line, system_info

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What the engine learns about the model from its worker."""

    name: str
    arch: ModelArch
    tokenizer: Any  # a transformers tokenizer, or None (dummy presets)
    device: str  # the resolved device, e.g. "cpu", "cuda"
    dtype: str  # storage dtype of weights and KV cache, e.g. "bfloat16"
    max_model_len: int  # the model's context (before the KV cache caps it)
    eos_token_ids: list[int]
    load_time_s: float
    system: dict[str, str]  # CPU, flags, kernel variant, dtypes, threads (system_info.py)


class Worker:
    """Loads and runs the model on one device (see the module docstring). With a
    ParallelState (a worker process of executor/multiproc.py): this rank's part of it."""

    def __init__(self, config: EngineConfig, parallel=None, device: str | None = None):
        self.config = config
        self.parallel = parallel
        self.device = device = device or config.device.resolved_device()
        if device == "cpu":
            torch.set_num_threads(config.parallel.threads_per_worker() if parallel is not None
                                  else config.device.num_threads or default_num_threads())
        torch.manual_seed(config.model.seed)
        self.cpu_isa = select_isa(config.kernel.cpu_isa) if device == "cpu" else None
        t0 = time.perf_counter()
        backend = get_attention_backend("torch")
        self.loaded = load_model(config.model, device, backend, parallel)
        self.model = self.loaded.model
        self.cache_arch = self._cache_arch()
        self.draft = None if parallel is not None else load_separate_draft(config, device,
                                                                           backend)
        self.load_time_s = time.perf_counter() - t0
        self.eos_token_ids = self._eos_ids()
        self._apply_kernel_config()
        self.system = system_info(device, self.cpu_isa, torch.get_num_threads(),
                                  self.loaded.dtype, self.model.model.compute_dtype)
        self.system["prefill_dtype"] = "bfloat16" if prefill_gemm.in_bf16() else "float32"
        if device == "cpu":
            self.system["lowbit_multi_row"] = quant_kernels.multi_row_kernels()
        log.info("system: %s", format_line(self.system))
        self.kv_cache = self.runner = self.drafter = None
        self.max_model_len = self.loaded.max_model_len
        self.lora = None
        if config.lora.enable_lora:
            from turbollm.worker.lora_manager import LoRAManager
            self.lora = LoRAManager(self.model, self.loaded.arch, config.lora, device)

    def _cache_arch(self) -> ModelArch:
        """The shapes this rank's KV cache holds: its stage's layers and its KV heads."""
        arch, ps = self.loaded.arch, self.parallel
        if ps is None:
            return arch
        from turbollm.distributed.parallel_state import rank_arch
        lo, hi = self.model.model.layer_range
        return rank_arch(arch, ps.tp_size, ps.tp_rank, hi - lo)

    def _apply_kernel_config(self) -> None:
        """KernelConfig: native decode per model; activation rounding and GPU tiles are
        process-wide switches of the kernel modules."""
        kc = self.config.kernel
        # the native C decode step runs whole models: in one process, or as a tensor-parallel
        # rank of one stage (models/llama.py LlamaModel._forward_native)
        self.set_native_decode(kc.native_decode)
        quant_kernels.exact_activations(kc.exact_activations)
        prefill_gemm.use_bf16(self._prefill_in_bf16())
        if kc.tile_config is not None:
            from turbollm.quantization import gpu_kernels  # imports Triton
            gpu_kernels.load_tile_config(kc.tile_config)

    def _prefill_in_bf16(self) -> bool:
        return multi_row_products_in_bf16(
            self.config.kernel.prefill_dtype, self.cpu_isa, self.config.model.dtype,
            self.loaded.dtype, self.model.model.compute_dtype)

    def set_native_decode(self, on: bool) -> None:
        """Decode-shaped CPU steps through the C path (models/native_decode.py) or the torch
        modules; switchable between steps, for A/B runs."""
        for lm in (self.loaded, self.draft):
            if lm is not None:
                lm.model.model.native_decode = on

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def model_info(self) -> ModelInfo:
        lm = self.loaded
        return ModelInfo(lm.source.name, lm.arch, lm.tokenizer, self.device,
                         str(lm.dtype).removeprefix("torch."), lm.max_model_len,
                         self.eos_token_ids, self.load_time_s, dict(self.system))

    def _eos_ids(self) -> list[int]:
        ids = list(self.loaded.arch.eos_token_id)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None
        if not ids and tok_eos is not None:
            ids = [tok_eos]
        return ids

    def num_kv_blocks(self) -> int:
        """KV blocks that fit the budget: as configured, or on CUDA what a full-size step
        leaves free (measure, then size); a separate draft's cache shares it."""
        cc, lm = self.config.cache, self.loaded
        if cc.num_gpu_blocks_override:
            return cc.num_gpu_blocks_override
        peak = None
        if (self.device.startswith("cuda") and cc.kv_cache_memory_bytes is None
                and self.parallel is None):  # (a rank's part cannot run a pass alone)
            step = min(self.config.scheduler.max_num_batched_tokens, lm.max_model_len)
            peak = profile_peak_bytes(self.model, lm.arch, step, cc.block_size, lm.dtype,
                                      self.device, self.config.scheduler.max_num_seqs)
        budget = kv_budget_bytes(cc.kv_cache_memory_bytes, self.device, peak)
        budget = int(budget * draft_kv_share(lm.arch, lm.dtype, self.draft, cc.kv_cache_dtype))
        return blocks_for_budget(self.cache_arch, budget, cc.block_size, lm.dtype,
                                 cc.kv_cache_dtype)

    def init_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, build the runner and any draft proposer, and calibrate
        AWQ/GPTQ (which runs the model, so it comes last)."""
        cc, lm = self.config.cache, self.loaded
        self.max_model_len = min(lm.max_model_len, num_blocks * cc.block_size)
        self.kv_cache = allocate_kv_cache(self.cache_arch, num_blocks, cc.block_size, lm.dtype,
                                          self.device, cc.kv_cache_dtype)
        self.runner = ModelRunner(self.model, self.kv_cache, cc.block_size, self.device,
                                  lm.arch.vocab_size, self.eos_token_ids,
                                  self.config.kernel.batch_invariant, self.lora,
                                  samples=self.parallel is None or self.parallel.is_reply_rank)
        if self.config.speculative.speculative_method == "draft":
            self.drafter = build_draft_proposer(self.config, lm, self.runner.kv_views,
                                                self.draft, num_blocks, self.device)
        if self.config.model.quantization in ("awq", "gptq"):
            from turbollm.worker.calibration import quantize_at_load
            quantize_at_load(self, self.config.model.quantization,
                             self.config.model.quantization_group_size)

    @property
    def draft_cost_per_token(self) -> float | None:
        """One draft forward, in target decode steps (None without a draft model)."""
        return None if self.drafter is None else self.drafter.cost_per_token

    def execute(self, batch: StepBatch) -> ModelRunnerOutput:
        return self.runner.execute(batch)

    def linear_methods(self) -> dict[str, str]:
        """How each linear layer computes ({name: QuantMethod name}), for checks and logs."""
        return {n: m.quant_method.name for n, m in self.model.named_modules()
                if hasattr(m, "quant_method")}

    def native_decode_runs(self) -> dict[str, int]:
        """Steps the native decoder ran in its C and Python loops (models/native_decode.py;
        empty before its first step), for checks of which path ran."""
        decoder = getattr(getattr(self.model, "model", None), "native_decoder", None)
        return dict(decoder.runs) if decoder is not None else {}

    def add_lora(self, req: LoRARequest, adapter: PeftAdapter | None = None,
                 pinned: frozenset[int] | None = None) -> None:
        """Load an adapter (checked against the model) so requests can name it, from its
        files or as `adapter` read them already; a ValueError says in one line why it cannot
        be served. `pinned`: adapters that must stay in memory (LoRAManager.add)."""
        if self.lora is None:
            raise ValueError("LoRA adapters need enable_lora=True (--enable-lora)")
        self.lora.add(req, adapter, pinned)

    def loaded_lora_ids(self) -> list[int]:
        """The adapters held in memory (requests naming them read no file)."""
        return [] if self.lora is None else self.lora.loaded_ids()

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; requests still naming it load it again."""
        return self.lora is not None and self.lora.remove(lora_id)

    def propose(self, work: list[DraftWork]) -> list[list[int]]:
        """The draft model's proposals for each request (speculative decoding)."""
        return self.drafter.propose(work)

    def score_logits(self, token_ids: list[int], block_ids: list[int] | None = None
                     ) -> torch.Tensor:
        """Next-token logits at every position: [len, vocab] fp32, computed into `block_ids`,
        or, at start-up before the engine owns any block, into the first blocks."""
        if block_ids is None:
            block_ids = list(range(-(-len(token_ids) // self.config.cache.block_size)))
        return self.runner.forward_logits(list(token_ids), block_ids,
                                          self.config.scheduler.max_num_batched_tokens)

    def embed(self, token_ids: list[int], block_ids: list[int], pooling: str) -> list[float]:
        """One sequence's pooled final hidden state (`mean` or `last`), computed into
        `block_ids`."""
        vec = self.runner.forward_pooled(list(token_ids), block_ids,
                                         self.config.scheduler.max_num_batched_tokens, pooling)
        return None if vec is None else vec.tolist()  # None: a pipeline stage before the last
