"""ModelRunner: SchedulerOutput -> flat batch -> forward -> logits -> sampled tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from turbollm.attention.backend import AttentionMetadata
from turbollm.engine.scheduler import SchedulerOutput
from turbollm.layers.sampler import Sampler, SamplingMetadata
from turbollm.worker.kv_cache import layer_views


@dataclass
class ModelRunnerOutput:
    """Per scheduled request (same order as SchedulerOutput.requests)."""

    # The token sampled for each request, or None for a partial prefill chunk.
    sampled_token_ids: list[int | None]
    # Logprobs of the sampled token (and top-k) where the request asked for them.
    logprobs: list[Any | None]


@dataclass
class FlatBatch:
    """One step's tokens laid out back to back (decodes first)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    # Row of `hidden` whose logits are sampled, and the index in SchedulerOutput it belongs to.
    sample_rows: list[int]
    sample_owner: list[int]


class ModelRunner:
    """Owns the model, the KV cache tensor and per-request sampling generators."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: str, vocab_size: int, eos_token_ids: list[int]):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_views = layer_views(kv_cache)
        self.block_size = block_size
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_ids) -> None:
        """Forget per-request state of finished requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, req) -> torch.Generator | None:
        seed = req.params.seed
        if seed is None:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req.request_id] = gen
        return gen

    def build_batch(self, so: SchedulerOutput) -> FlatBatch:
        """Flatten the scheduled work: token ids, positions, cache slots, attention groups."""
        bs = self.block_size
        counts = so.num_scheduled_tokens
        order = sorted(range(len(so.requests)), key=lambda i: counts[i] != 1)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_tables, dec_lens, prefills = [], [], []
        sample_rows, sample_owner = [], []
        for i in order:
            req, n, table = so.requests[i], counts[i], so.block_tables[i]
            start = req.num_computed_tokens
            end = start + n
            first = len(ids)
            ids.extend(req.all_token_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                prefills.append((first, n, end, torch.tensor(table, dtype=torch.long)))
            if end == req.num_tokens:  # the chunk reaches the end: its last logits are sampled
                sample_rows.append(len(ids) - 1)
                sample_owner.append(i)
        dev = self.device
        num_decodes = len(dec_lens)
        dec_bt = dec_sl = None
        if num_decodes:
            width = max(len(t) for t in dec_tables)
            dec_bt = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables],
                                  dtype=torch.long).to(dev, non_blocking=True)
            dec_sl = torch.tensor(dec_lens, dtype=torch.long).to(dev, non_blocking=True)
        if dev.type != "cpu":
            prefills = [(a, b, c, t.to(dev, non_blocking=True)) for a, b, c, t in prefills]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            num_decodes=num_decodes, decode_block_tables=dec_bt, decode_seq_lens=dec_sl,
            prefills=prefills, block_size=bs)
        return FlatBatch(
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True),
            meta=meta, sample_rows=sample_rows, sample_owner=sample_owner)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step of the model and sample where a request's chunk reached its end."""
        batch = self.build_batch(so)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_views, batch.meta)
        sampled: list[int | None] = [None] * len(so.requests)
        logprobs: list[Any | None] = [None] * len(so.requests)
        if batch.sample_rows:
            rows = torch.tensor(batch.sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            reqs = [so.requests[i] for i in batch.sample_owner]
            meta = SamplingMetadata.build(
                params=[r.params for r in reqs],
                prompt_token_ids=[r.prompt_token_ids for r in reqs],
                output_token_ids=[r.output_token_ids for r in reqs],
                generators=[self._generator(r) for r in reqs],
                vocab_size=self.vocab_size, device=self.device,
                eos_token_ids=self.eos_token_ids)
            out = self.sampler(logits, meta)
            for j, i in enumerate(batch.sample_owner):
                sampled[i] = out.sampled_token_ids[j]
                logprobs[i] = out.logprobs[j] if out.logprobs else None
        return ModelRunnerOutput(sampled, logprobs)

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[int], block_ids: list[int], chunk: int
                       ) -> torch.Tensor:
        """Logits at every position of one sequence, prefilled `chunk` tokens at a time into
        the given blocks: [len(token_ids), vocab] fp32. For scoring (perplexity, calibration),
        not for serving."""
        bs = self.block_size
        dev = self.device
        table = torch.tensor(block_ids, dtype=torch.long, device=dev)
        outs = []
        for start in range(0, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            pos = torch.arange(start, end, device=dev)
            slots = table[pos // bs] * bs + pos % bs
            meta = AttentionMetadata(slot_mapping=slots, num_decodes=0,
                                     decode_block_tables=None, decode_seq_lens=None,
                                     prefills=[(0, end - start, end, table)], block_size=bs)
            ids = torch.tensor(token_ids[start:end], dtype=torch.long, device=dev)
            hidden = self.model(ids, pos, self.kv_views, meta)
            outs.append(self.model.compute_logits(hidden))
        return torch.cat(outs)
