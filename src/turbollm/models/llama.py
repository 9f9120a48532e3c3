"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) with HF parameter names.

q/k/v and gate/up are fused into one matmul each; checkpoint tensors are routed to their shard
by `load_weights`, so any format that yields (hf_name, tensor) pairs loads.

With a ParallelState (distributed/parallel_state.py) the model is one rank's part: its heads
and MLP columns (layers/parallel_linear.py) and, under pipeline parallelism, only its stage's
layers; the embedding lives on the first stage, the norm and LM head on the last.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from turbollm.attention.backend import AttentionBackend, AttentionMetadata
from turbollm.distributed.parallel_state import (ParallelState, head_split, stage_layers,
                                                 vocab_split)
from turbollm.layers.activation import silu_and_mul
from turbollm.layers.layernorm import RMSNorm
from turbollm.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from turbollm.layers.parallel_linear import (ColumnMergedLinear, ColumnQKVLinear,
                                             RowParallelLinear, VocabParallelEmbedding,
                                             VocabParallelLMHead, reads_slices)
from turbollm.layers.rotary import RotaryEmbedding
from turbollm.model_arch import ModelArch
from turbollm.models.native_decode import NativeDecoder
from turbollm.quantization import kernels as quant_kernels

# checkpoint name piece -> (our fused parameter name piece, shard id)
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, wkw: dict,
                 tp: "ParallelState | None" = None):
        super().__init__()
        self.head_dim = arch.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = arch.sliding_window
        if tp is None:
            self.num_heads, self.num_kv_heads = arch.num_attention_heads, arch.num_key_value_heads
            self.qkv_proj = QKVLinear(arch.hidden_size, arch.q_size, arch.kv_size,
                                      bias=arch.attention_bias, **wkw)
            self.o_proj = ReplicatedLinear(arch.q_size, arch.hidden_size, **wkw)
        else:  # this rank's heads (KV heads split, or replicated when fewer than ranks)
            self.num_heads, kv_start, self.num_kv_heads = head_split(
                arch.num_attention_heads, arch.num_key_value_heads, tp.tp_size, tp.tp_rank)
            self.qkv_proj = ColumnQKVLinear(arch.hidden_size, self.head_dim, self.num_heads,
                                            kv_start, self.num_kv_heads, tp.tp_rank,
                                            bias=arch.attention_bias, **wkw)
            self.o_proj = RowParallelLinear(arch.q_size, arch.hidden_size, tp.tp, **wkw)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.backend = backend

    def forward(self, rope, x, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden] -> qkv: [T, q_size + 2 * kv_size]
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads,
                                                      self.head_dim)
        qk = RotaryEmbedding.apply(rope, qk)  # [T, H + KVH, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                                 self.sliding_window)
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, wkw: dict, tp: "ParallelState | None" = None):
        super().__init__()
        if tp is None:
            self.gate_up_proj = MergedLinear(arch.hidden_size, [arch.intermediate_size] * 2,
                                             **wkw)
            self.down_proj = ReplicatedLinear(arch.intermediate_size, arch.hidden_size, **wkw)
        else:  # this rank's intermediate columns: gate/up column-parallel, down row-parallel
            self.gate_up_proj = ColumnMergedLinear(arch.hidden_size,
                                                   [arch.intermediate_size] * 2, tp.tp_size,
                                                   tp.tp_rank, **wkw)
            self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, tp.tp,
                                               **wkw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend, kw: dict, wkw: dict,
                 tp: "ParallelState | None" = None):
        super().__init__()
        self.self_attn = LlamaAttention(arch, backend, wkw, tp)
        self.mlp = LlamaMLP(arch, wkw, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)

    def forward(self, rope, h, kv_cache, meta) -> torch.Tensor:
        h = h + self.self_attn(rope, self.input_layernorm(h), kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class MissingLayer(nn.Module):
    """A decoder layer another pipeline stage runs (keeps the checkpoint's layer numbering)."""


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, backend, max_position: int, dtype, device, weight_dtype,
                 parallel: ParallelState | None = None):
        super().__init__()
        # Activations, norms and rotary tables in `dtype`; embedding and linear weights stored
        # in `weight_dtype` (narrower where the device stores bf16 but computes fp32).
        kw = {"dtype": dtype, "device": device}
        wkw = {"dtype": weight_dtype, "device": device}
        self.compute_dtype = dtype
        self.hidden_size = arch.hidden_size
        self.parallel = parallel
        tp = parallel if parallel is not None and parallel.tp is not None else None
        first = parallel is None or parallel.is_first_stage
        last = parallel is None or parallel.is_last_stage
        # (the last stage's LM head counts as the layers it is worth in weights)
        self.layer_range = (0, arch.num_hidden_layers) if parallel is None else stage_layers(
            arch.num_hidden_layers, parallel.pp_size, parallel.pp_rank,
            arch.vocab_size * arch.hidden_size / arch.linear_params_per_layer())
        # the embedding: on the first stage, and on the last where the LM head is tied to it
        self.embed_tokens = None
        if first or (last and arch.tie_word_embeddings):
            if tp is None:
                self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, **wkw)
                self.embed_tokens.weight.requires_grad_(False)
            else:
                self.embed_tokens = VocabParallelEmbedding(
                    arch.vocab_size, arch.hidden_size, tp.tp,
                    *vocab_split(arch.vocab_size, tp.tp_size, tp.tp_rank), **wkw)
        self.rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta,
                                      arch.rope_scaling, dtype=dtype, device=device)
        lo, hi = self.layer_range
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, backend, kw, wkw, tp)
                                    if lo <= i < hi else MissingLayer()
                                    for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw) if last else None
        self.native_decoder: NativeDecoder | None = None  # made at the first CPU step
        self.native_decode = True  # KernelConfig.native_decode, set by the worker
        # LoRA (layers/lora.py): the step's rows per adapter slot, set by the worker's runner
        self.lora_context = None

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """Runs the first len(kv_caches) layers: all of them, or a self-speculation draft's."""
        if self.parallel is not None:
            return self._forward_parallel(input_ids, positions, kv_caches, meta)
        # (decode-shaped steps with LoRA rows too: the native decoder adds the adapter terms)
        out = self._forward_native(input_ids, positions, kv_caches, meta)
        if out is not None:
            return out
        h = self.embed_tokens(input_ids).to(self.compute_dtype)
        rope = self.rotary.cos_sin(positions)  # shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(rope, h, kv_cache, meta)
        return self.norm(h)

    def _forward_native(self, input_ids, positions, kv_caches, meta, hidden_in=None):
        """The native decoder's output (models/native_decode.py), or None where the step does
        not qualify."""
        if not self.native_decode or input_ids.device.type != "cpu":
            return None
        if self.native_decoder is None:
            self.native_decoder = NativeDecoder(self)
        return self.native_decoder.forward(input_ids, positions, kv_caches, meta, hidden_in)

    def _forward_parallel(self, input_ids, positions, kv_caches, meta) -> torch.Tensor | None:
        """One rank's part. kv_caches holds this stage's layers. A stage before the last sends
        its hidden states on and returns None; every stage after the first receives them
        ([T, hidden], T known to all: each rank builds the same flat batch from the same
        StepBatch)."""
        ps = self.parallel
        h = None
        if not ps.is_first_stage:
            h = ps.recv_prev((input_ids.shape[0], self.hidden_size), self.compute_dtype,
                             input_ids.device)
        out = self._forward_native(input_ids, positions, kv_caches, meta, h)
        if out is None:  # the module path
            if h is None:
                h = self.embed_tokens(input_ids).to(self.compute_dtype)
            rope = self.rotary.cos_sin(positions)
            lo, hi = self.layer_range
            for i in range(lo, hi):
                h = self.layers[i](rope, h, kv_caches[i - lo], meta)
            out = self.norm(h) if ps.is_last_stage else h
        if not ps.is_last_stage:
            ps.send_next(out)
            return None
        return out


class LlamaForCausalLM(nn.Module):
    """input_ids/positions of the flat batch -> hidden states; `compute_logits` on chosen rows."""

    def __init__(self, arch: ModelArch, backend: AttentionBackend, max_position: int,
                 dtype: torch.dtype, device: torch.device | str,
                 weight_dtype: torch.dtype | None = None, parallel: ParallelState | None = None):
        super().__init__()
        self.arch = arch
        self.parallel = parallel
        weight_dtype = weight_dtype or dtype
        self.model = LlamaModel(arch, backend, max_position, dtype, device, weight_dtype,
                                parallel)
        self.lm_head = None  # on the last pipeline stage only
        if parallel is None or parallel.is_last_stage:
            if parallel is None or parallel.tp is None:
                self.lm_head = ReplicatedLinear(arch.hidden_size, arch.vocab_size,
                                                dtype=weight_dtype, device=device)
            else:
                self.lm_head = VocabParallelLMHead(
                    arch.hidden_size, arch.vocab_size, parallel.tp,
                    *vocab_split(arch.vocab_size, parallel.tp_size, parallel.tp_rank),
                    dtype=weight_dtype, device=device)
            if arch.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        self._head_kernels: dict = {}  # (rows, kernel switches) -> (method, weight ptr, call)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, hidden] -> logits: [R, vocab] in fp32 (sampling wants full precision)
        logits = self._head_logits(hidden)
        if isinstance(self.lm_head, VocabParallelLMHead):  # [R, V / T] per rank -> [R, V]
            logits = self.lm_head.gather(logits)
        return logits

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        if (hidden.dtype == torch.float32 and hidden.device.type == "cpu"
                and hidden.is_contiguous() and head.bias is None):
            # the C call lm_head would make, bound once per row count: the module call's
            # Python (~50 us) is felt in every decode step. Rebound if the head's method or
            # weight tensor changes.
            method, weight = head.quant_method, getattr(head, "weight", None)
            state = (method, None if weight is None else weight.data_ptr())
            key = (hidden.shape[0], quant_kernels.dispatch_key())
            entry = self._head_kernels.get(key)
            if entry is None or entry[0] is not state[0] or entry[1] != state[1]:
                if len(self._head_kernels) >= 256:
                    self._head_kernels.clear()
                entry = self._head_kernels[key] = (*state, method.row_kernel(head, key[0]))
            if entry[2] is not None:
                logits = torch.empty(hidden.shape[0], head.out_features)
                entry[2](hidden.data_ptr(), logits.data_ptr())
                return logits
        return head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Put each (hf_name, tensor) in place; raise if a parameter was never loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # tied: the embedding is the head
            shard = None
            for piece, (fused, shard_id) in FUSED_SHARDS.items():
                if f".{piece}." in name:
                    name, shard = name.replace(f".{piece}.", f".{fused}."), shard_id
                    break
            param = params.get(name)
            if param is None and self.parallel is not None and self.parallel.pp_size > 1:
                continue  # another pipeline stage's tensor (_check_complete checks ours)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            loader = getattr(param, "weight_loader", None)
            if hasattr(tensor, "materialize") and not reads_slices(loader):
                tensor = tensor.materialize()  # a lazy checkpoint tensor this layer needs whole
            if loader is not None:
                loader(param, tensor.to(param.dtype), shard)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint "
                                     f"{tuple(tensor.shape)} vs model {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(name if shard is None else f"{name}[{shard}]")
        self._check_complete(loaded)
        return loaded

    def _check_complete(self, loaded: set[str]) -> None:
        expected = set()
        for name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full == "lm_head.weight" and self.arch.tie_word_embeddings:
                    continue
                if isinstance(module, QKVLinear):
                    expected.update(f"{full}[{s}]" for s in ("q", "k", "v"))
                elif isinstance(module, MergedLinear):
                    expected.update(f"{full}[{s}]" for s in range(len(module.out_sizes)))
                else:
                    expected.add(full)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. "
                             f"{sorted(missing)[:3]}")
