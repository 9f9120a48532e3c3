"""ModelRunner: StepBatch -> flat batch -> forward -> logits -> sampled tokens."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from turbollm.attention.backend import AttentionMetadata
from turbollm.core.batch import ModelRunnerOutput, SequenceWork, StepBatch
from turbollm.layers import prefill_gemm as multi_row
from turbollm.layers.sampler import (Sampler, SamplingMetadata, compute_logprobs,
                                     greedy_tokens, token_logprobs)
from turbollm.layers.rejection_sampler import verify_greedy, verify_random
from turbollm.worker.faults import fault_plan_from_env
from turbollm.worker.flat_batch import SeqChunk, pack_sequences
from turbollm.worker.kv_cache import layer_views

# Prompt logprobs: logits rows made at once (x vocab x 4 bytes: 256 rows of a 128K vocabulary
# are 128 MiB).
PROMPT_LOGITS_ROWS = 256


@dataclass
class FlatBatch:
    """One step's tokens laid out back to back (decodes first)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    # Rows of `hidden` whose logits are sampled, and the index in StepBatch.sequences each
    # belongs to. A request verifying k proposals owns k + 1 consecutive rows.
    sample_rows: list[int]
    sample_owner: list[int]
    # Proposals being verified, per sequence (empty lists for plain requests).
    proposals: list[list[int]]
    # First row of each request's chunk.
    offsets: list[int]


class ModelRunner:
    """Owns the model, the KV cache tensor and per-request sampling generators."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: str, vocab_size: int, eos_token_ids: list[int],
                 batch_invariant: str = "seeded", lora=None, samples: bool = True):
        self.model = model
        # False on the tensor-parallel ranks whose tokens the engine does not take: they run
        # every collective (logits included) but skip sampling
        self.samples = samples
        self.lora = lora  # a worker/lora_manager.LoRAManager when adapters are enabled
        self.kv_cache = kv_cache
        self.kv_views = layer_views(kv_cache)
        self.block_size = block_size
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}
        self.batch_invariant = batch_invariant  # KernelConfig.batch_invariant
        self.faults = fault_plan_from_env()  # reliability tests only (worker/faults.py)

    def release(self, request_ids) -> None:
        """Forget per-request state of finished requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, req: SequenceWork) -> torch.Generator | None:
        seed = req.params.seed
        if seed is None:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req.request_id] = gen
        return gen

    def build_batch(self, seqs: list[SequenceWork]) -> FlatBatch:
        """Flatten the scheduled work: token ids, positions, cache slots, attention groups."""
        chunks = [SeqChunk(s.token_ids, s.start, s.block_ids) for s in seqs]
        packed = pack_sequences(chunks, self.block_size, self.device)
        sample_rows, sample_owner = [], []
        for i, s in enumerate(seqs):
            if s.sample:  # the chunk reaches the end: its last k + 1 rows (k proposals)
                last = packed.offsets[i] + len(s.token_ids) - 1
                k = s.num_proposals
                sample_rows.extend(range(last - k, last + 1))
                sample_owner.extend([i] * (k + 1))
        return FlatBatch(packed.input_ids, packed.positions, packed.meta, sample_rows,
                         sample_owner, [s.proposals for s in seqs], packed.offsets)

    @torch.inference_mode()
    def execute(self, step: StepBatch) -> ModelRunnerOutput:
        """Run one step of the model; sample (or verify proposals) where a chunk reached its end."""
        self.release(step.finished_request_ids)
        if self.faults is not None:
            self.faults.before_forward()
        so = step.sequences
        batch = self.build_batch(so)
        if self.lora is not None:  # each chunk's rows run with its request's adapter slot
            slots = self.lora.slots_for([s.lora for s in so])
            self.lora.begin_step([(batch.offsets[i], len(s.token_ids), slots[i])
                                  for i, s in enumerate(so)])
        try:
            # A verification's rows must equal one-row decoding bit for bit, the logits included
            with multi_row.row_invariant(any(batch.proposals) or self._invariant_step(so)):
                return self._run(so, batch)
        finally:
            if self.lora is not None:  # other forward passes (a draft, scoring) run the base
                self.lora.end_step()

    def _invariant_step(self, so: list[SequenceWork]) -> bool:
        """Whether every row of this step is computed as if alone (KernelConfig.batch_invariant):
        a seeded sampling request's tokens must depend on its seed, not on its neighbours."""
        if self.batch_invariant == "seeded":
            return any(s.params.seeded_sampling for s in so)
        return self.batch_invariant == "all"

    def _run(self, so: list[SequenceWork], batch: FlatBatch) -> ModelRunnerOutput:
        hidden = self.model(batch.input_ids, batch.positions, self.kv_views, batch.meta)
        sampled: list[list[int]] = [[] for _ in so]
        logprobs: list[list[Any] | None] = [None] * len(so)
        if hidden is None:  # a pipeline stage before the last: its output went on
            return ModelRunnerOutput(sampled, logprobs, None)
        prompt_lps = self._prompt_logprobs(so, batch, hidden)
        if not batch.sample_rows:
            return ModelRunnerOutput(sampled, logprobs, prompt_lps)
        if batch.sample_rows != list(range(hidden.shape[0])):  # else every row, in order
            hidden = hidden.index_select(0, torch.tensor(batch.sample_rows, device=self.device))
        logits = self.model.compute_logits(hidden)
        if not self.samples:
            return ModelRunnerOutput(sampled, logprobs, prompt_lps)
        meta = self._sampling_metadata(so, batch)
        if not any(batch.proposals):
            out = self.sampler(logits, meta)
            for j, i in enumerate(batch.sample_owner):
                sampled[i] = [out.sampled_token_ids[j]]
                if out.logprobs and out.logprobs[j] is not None:
                    logprobs[i] = [out.logprobs[j]]
            return ModelRunnerOutput(sampled, logprobs, prompt_lps)
        self._verify(so, batch, logits, meta, sampled, logprobs)
        return ModelRunnerOutput(sampled, logprobs, prompt_lps)

    def _prompt_logprobs(self, so: list[SequenceWork], batch: FlatBatch, hidden: torch.Tensor
                         ) -> list[list[Any] | None] | None:
        """Logprobs of the prompt tokens this step's chunks predict, for requests that ask.

        Row p of a chunk predicts prompt token p + 1; tokens already scored (before a
        preemption) are not scored again. Logits are made PROMPT_LOGITS_ROWS rows at a time so
        a long chunk never holds [chunk, vocab] at once.
        """
        out: list[list[Any] | None] | None = None
        for i, req in enumerate(so):
            if req.num_prompt_logprobs < 0:
                continue
            start = req.start
            first = max(start, req.num_prompt_logprobs)  # first position to score
            end = min(start + len(req.token_ids), req.num_prompt_tokens - 1)
            if first >= end:
                continue
            found = []
            for a in range(first, end, PROMPT_LOGITS_ROWS):
                b = min(a + PROMPT_LOGITS_ROWS, end)
                rows = hidden[batch.offsets[i] + a - start:batch.offsets[i] + b - start]
                targets = torch.tensor(req.prompt_token_ids[a + 1:b + 1], device=self.device)
                found.extend(token_logprobs(self.model.compute_logits(rows), targets,
                                            req.params.prompt_logprobs))
            if out is None:
                out = [None] * len(so)
            out[i] = found
        return out

    def _sampling_metadata(self, so: list[SequenceWork], batch: FlatBatch) -> SamplingMetadata:
        """One row per sampled position; row j of a verifying request sees proposals[:j] as
        already generated, so penalties and min_tokens apply exactly as in plain decoding."""
        params, prompts, outputs, gens, masks = [], [], [], [], []
        j_of: dict[int, int] = {}
        for i in batch.sample_owner:
            req = so[i]
            j = j_of[i] = j_of.get(i, -1) + 1
            params.append(req.params)
            prompts.append(req.prompt_token_ids)
            outputs.append(req.output_token_ids + batch.proposals[i][:j] if j
                           else req.output_token_ids)
            gens.append(self._generator(req))
            # engine-filled (structured_output/); constrained requests get no proposals
            masks.append(req.grammar_bitmask if j == 0 else None)
        return SamplingMetadata.build(
            params=params, prompt_token_ids=prompts, output_token_ids=outputs, generators=gens,
            vocab_size=self.vocab_size, device=self.device, eos_token_ids=self.eos_token_ids,
            grammar_bitmasks=masks)

    def _verify(self, so, batch: FlatBatch, logits, meta: SamplingMetadata, sampled, logprobs
                ) -> None:
        """Accept/reject each request's proposals (layers/rejection_sampler.py) from its k + 1 rows."""
        x = self.sampler.process(logits, meta)
        greedy = greedy_tokens(x) if not meta.all_random else None
        probs = None
        if not meta.all_greedy:
            rand = x if meta.all_random else x[meta.random_rows]
            probs = self.sampler.random_probs(rand, meta)
        # Random rows are numbered in row order inside `probs`.
        random_index = {}
        if probs is not None:
            rr = range(meta.num_rows) if meta.all_random else meta.random_rows.tolist()
            random_index = {r: k for k, r in enumerate(rr)}
        first_row: dict[int, int] = {}
        for r, i in enumerate(batch.sample_owner):
            first_row.setdefault(i, r)
        emitted_rows, emitted_tokens = [], []
        for i, r0 in first_row.items():
            req, props = so[i], batch.proposals[i]
            if req.params.greedy:
                tokens = verify_greedy(props, greedy[r0:r0 + len(props) + 1])
            else:
                k0 = random_index[r0]
                tokens = verify_random(props, probs[k0:k0 + len(props) + 1],
                                       self._generator(req))
            sampled[i] = tokens
            emitted_rows.extend(range(r0, r0 + len(tokens)))
            emitted_tokens.extend(tokens)
        if meta.max_num_logprobs >= 0:
            self._emitted_logprobs(logits, meta, batch, emitted_rows, emitted_tokens, logprobs)

    @staticmethod
    def _emitted_logprobs(logits, meta, batch, rows, tokens, logprobs) -> None:
        """Raw-logit logprobs of every emitted token, from the row that produced it."""
        full = torch.zeros(meta.num_rows, dtype=torch.long, device=logits.device)
        full[torch.tensor(rows, device=logits.device)] = torch.tensor(tokens,
                                                                      device=logits.device)
        per_row = compute_logprobs(logits, full, meta)
        for r in rows:
            lp = per_row[r]
            if lp is not None:
                i = batch.sample_owner[r]
                if logprobs[i] is None:
                    logprobs[i] = []
                logprobs[i].append(lp)

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[int], block_ids: list[int], chunk: int
                       ) -> torch.Tensor:
        """Logits at every position of one sequence, prefilled `chunk` tokens at a time into
        the given blocks: [len(token_ids), vocab] fp32. For scoring (perplexity, calibration),
        not for serving: always the module path, whose forward hooks calibration reads."""
        with self._module_path():
            outs = [self.model.compute_logits(h)
                    for h in self._prefill_chunks(token_ids, block_ids, chunk)]
        return torch.cat(outs) if outs else None  # None: a pipeline stage before the last

    def forward_pooled(self, token_ids: list[int], block_ids: list[int], chunk: int,
                       pooling: str) -> torch.Tensor:
        """One sequence's final (normed) hidden states pooled into a vector, [hidden] fp32:
        `mean` over every position or the `last` position's (embeddings)."""
        with self._module_path():
            total, last = None, None
            for h in self._prefill_chunks(token_ids, block_ids, chunk):
                last = h[-1].float()
                if pooling == "mean":
                    part = h.float().sum(0)
                    total = part if total is None else total + part
        if last is None:
            return None  # a pipeline stage before the last
        return last if pooling == "last" else total / len(token_ids)

    @contextlib.contextmanager
    def _module_path(self):
        if self.faults is not None:
            self.faults.before_forward()
        inner = self.model.model
        native, inner.native_decode = inner.native_decode, False
        try:
            yield
        finally:
            inner.native_decode = native

    def _prefill_chunks(self, token_ids: list[int], block_ids: list[int], chunk: int):
        """Final hidden states of one sequence, `chunk` positions at a time (nothing on a
        pipeline stage before the last)."""
        bs = self.block_size
        dev = self.device
        table = torch.tensor(block_ids, dtype=torch.long, device=dev)
        for start in range(0, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            pos = torch.arange(start, end, device=dev)
            slots = table[pos // bs] * bs + pos % bs
            meta = AttentionMetadata(slot_mapping=slots, num_decodes=0,
                                     decode_block_tables=None, decode_seq_lens=None,
                                     prefills=[(0, end - start, end, table)], block_size=bs)
            ids = torch.tensor(token_ids[start:end], dtype=torch.long, device=dev)
            hidden = self.model(ids, pos, self.kv_views, meta)
            if hidden is not None:  # None: a pipeline stage before the last
                yield hidden
