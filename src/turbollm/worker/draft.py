"""Draft-model proposals: a smaller model with the target's tokenizer proposes k tokens
autoregressively (argmax), batched over requests, with its own paged KV cache.

The draft's cache uses the target's block tables (same block ids, same block size), so the
scheduler's block accounting covers both, and keeps `k` lookahead slots per decoding request
for the draft's proposals. The engine sends each request's tokens, blocks and how many of them
the draft has seen (DraftWork), so the worker keeps no draft state. Two kinds of draft:
- a separate model (`--draft-model`, e.g. the target quantized to int4): its own cache tensor,
  caught up on each request's accepted tokens before proposing;
- self-speculation (`--draft-layers k`): the target's first k layers with its final norm and
  head. Their KV is exactly the target's first k layers' KV, so the draft reads and writes the
  target's own cache: nothing to catch up, no extra memory.
"""
from __future__ import annotations

import torch
from torch import nn

from turbollm.core.batch import DraftWork
from turbollm.worker.flat_batch import SeqChunk, pack_sequences


class TruncatedDraft(nn.Module):
    """The target's embedding, first `num_layers` decoder layers, final norm and head."""

    def __init__(self, target: nn.Module, num_layers: int):
        super().__init__()
        n = len(target.model.layers)
        if not 1 <= num_layers < n:
            raise ValueError(f"draft_layers must be in [1, {n - 1}] for this {n}-layer model, "
                             f"got {num_layers}")
        self.target = target
        self.num_layers = num_layers

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        # the target's decoder runs as many layers as it is given caches (C decode path too)
        assert len(kv_caches) == self.num_layers
        return self.target.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class DraftProposer:
    """Runs the draft model for every decoding request that asks for proposals."""

    def __init__(self, model: nn.Module, kv_views, block_size: int, device: str,
                 shares_target_kv: bool, cost_per_token: float):
        self.model = model
        self.kv_views = kv_views
        self.block_size = block_size
        self.device = torch.device(device)
        self.shares_target_kv = shares_target_kv
        self.cost_per_token = cost_per_token  # one draft forward, in target decode steps

    @torch.inference_mode()
    def propose(self, work: list[DraftWork]) -> list[list[int]]:
        """work[i].k tokens for each request (argmax of the draft, one at a time)."""
        out: list[list[int]] = [[] for _ in work]
        active = [i for i, w in enumerate(work) if w.k > 0]
        if not active:
            return out
        # First forward: catch up on tokens the draft has not seen (at least the last one).
        chunks = []
        for i in active:
            w = work[i]
            n = len(w.token_ids)
            start = n - 1 if self.shares_target_kv else min(w.num_computed, n - 1)
            chunks.append(SeqChunk(w.token_ids[start:], start, w.block_ids))
        for i, t in zip(active, self._step(chunks)):
            out[i].append(t)
        # Then one token at a time, for the requests that want more.
        for j in range(1, max(work[i].k for i in active)):
            live = [i for i in active if work[i].k > j]
            if not live:
                break
            chunks = [SeqChunk([out[i][-1]], len(work[i].token_ids) - 1 + j, work[i].block_ids)
                      for i in live]
            for i, t in zip(live, self._step(chunks)):
                out[i].append(t)
        return out

    def _step(self, chunks: list[SeqChunk]) -> list[int]:
        """One draft forward; the argmax after each chunk's last token."""
        packed = pack_sequences(chunks, self.block_size, self.device)
        hidden = self.model(packed.input_ids, packed.positions, self.kv_views, packed.meta)
        last = torch.tensor([o + len(c.token_ids) - 1 for o, c in zip(packed.offsets, chunks)],
                            device=self.device)
        return self.model.compute_logits(hidden.index_select(0, last)).argmax(-1).tolist()


def load_separate_draft(config, device: str, backend):
    """Load `--draft-model` (None for self-speculation or n-gram)."""
    spec = config.speculative
    if spec.speculative_method != "draft" or spec.draft_model is None:
        return None
    from dataclasses import replace

    from turbollm.worker.model_loader import load_model
    draft_cfg = replace(config.model, model=spec.draft_model, tokenizer=None,
                        quantization=spec.draft_quantization, load_format="auto")
    return load_model(draft_cfg, device, backend)


def linear_bytes(module: nn.Module) -> int:
    """Weight bytes of the linear layers in `module`, in whatever format each is served: a
    proxy for the cost of a batch-1 forward, which reads every weight once."""
    from turbollm.layers.linear import LinearBase
    from turbollm.quantization.weight_bytes import linear_weight_bytes
    return sum(linear_weight_bytes(m) for m in module.modules() if isinstance(m, LinearBase))


def build_draft_proposer(config, target, target_kv_views, draft, num_blocks: int,
                         device: str) -> DraftProposer:
    """The draft proposer: `draft` (a LoadedModel with its own cache of `num_blocks` blocks)
    or the target's first --draft-layers layers (a LoadedModel too)."""
    spec = config.speculative
    bs = config.cache.block_size
    if draft is not None:
        if draft.arch.vocab_size != target.arch.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.arch.vocab_size}) differs "
                             f"from the target's ({target.arch.vocab_size})")
        from turbollm.worker.kv_cache import allocate_kv_cache, layer_views
        cache = allocate_kv_cache(draft.arch, num_blocks, bs, draft.dtype, device,
                                  config.cache.kv_cache_dtype)
        return DraftProposer(draft.model, layer_views(cache), bs, device, shares_target_kv=False,
                             cost_per_token=linear_bytes(draft.model)
                             / linear_bytes(target.model))
    k = spec.draft_layers
    if k is None:
        raise ValueError("speculative_method 'draft' needs --draft-model or --draft-layers")
    model = TruncatedDraft(target.model, k)
    layers = target.model.model.layers
    share = ((linear_bytes(layers[0]) * k + linear_bytes(target.model.lm_head))
             / linear_bytes(target.model))
    return DraftProposer(model, target_kv_views[:k], bs, device, shares_target_kv=True,
                         cost_per_token=share)


def draft_kv_share(engine_arch, engine_dtype, draft, kv_cache_dtype: str = "auto") -> float:
    """Fraction of the KV budget the target gets when a separate draft keeps its own cache
    (both caches hold every block, in `kv_cache_dtype`, or each model's dtype for 'auto')."""
    if draft is None:
        return 1.0
    from turbollm.sizing import kv_cache_bytes_per_token
    from turbollm.worker.kv_cache import kv_storage_dtype
    t = kv_cache_bytes_per_token(engine_arch, kv_storage_dtype(engine_dtype, kv_cache_dtype))
    d = kv_cache_bytes_per_token(draft.arch, kv_storage_dtype(draft.dtype, kv_cache_dtype))
    return t / (t + d)
