"""Decode-shaped steps of a Llama-family model as direct C calls, without torch's per-op dispatch.

A decode step of a small model is ~400 small ops. Through nn.Module calls, torch dispatch and
tensor allocation each costs 5-10 us of Python, which was 40% of a step of the 135M model
(more with 4-bit weights, whose matmuls are faster). Here each decoder layer is ~10 calls of
the same C kernels the module path uses, so both paths compute the same numbers (the tests
compare them bit for bit). One C call (`decode_layers` in layers/csrc/cpu_ops.c) goes from
token ids to normed hidden states: embedding rows, the layer loop from a table of bound kernel
calls built once per row count and cache list, and the final norm; a layer that needs more (a
qkv bias) keeps the loop in Python, with the same calls.

A step takes this path when it is decode-shaped: on CPU with fp32 activations, at most
MAX_ROWS tokens, every chunk attending row by row (one token, or up to MAX_ROW_CHUNK: a
speculative verification, a short prompt chunk such as the scheduler cuts while others decode),
a KV cache the C attention reads, and every projection served by a C kernel at that row count.
Anything else takes the module path. Row-invariant steps (layers/prefill_gemm.row_invariant)
take this path at any row count and chunk length: every call here computes each row alone.
On a tensor-parallel rank the same calls run on the rank's heads and MLP columns, and the o and
down projections' partial sums go through the shared-memory all-reduce, called from C between
them. A pipeline stage runs its own layers: after the first it starts from the hidden states
it received, and before the last it returns them unnormed, for the next stage.
Rows with a LoRA adapter (layers/lora.py) get each projection's low-rank term right after its
kernel, by decode_layers itself (the plan holds each layer's slot tensors, the step each row's
slot) or, in the Python loop, by LinearLoRA.add_rows: the same C function either way.
"""
from __future__ import annotations

import array
import functools
import os

import torch

from turbollm.attention import native as native_attention
from turbollm.attention.backend import AttentionMetadata
from turbollm.attention.torch_sdpa import SMALL_QUERY
from turbollm.layers import lora as lora_module
from turbollm.layers import native_ops
from turbollm.layers import prefill_gemm as multi_row
from turbollm.native_build import function_address
from turbollm.quantization import kernels as quant_kernels

# Row counts up to which some projection kernel may serve; each step still checks that every
# projection has one for its T (dense weights stop at 128 rows, packed int4/int8 at 64).
MAX_ROWS = max(native_ops.MAX_DENSE_ROWS, *quant_kernels.MAX_ROWS_PACKED.values())
_c_loop = True
# The embedding tables decode_layers reads itself, by the name of their type in
# csrc/decode_abi.h; its sizes, offsets and codes come from the library (native_ops.decode_abi)
_EMBED_KINDS = {torch.float32: "EMBED_F32", torch.bfloat16: "EMBED_BF16",
                torch.float16: "EMBED_F16"}


def enable_c_loop(on: bool = True) -> None:
    """Run the layer loop in C (decode_layers) where it can, or always in Python: for A/B runs
    and the tests that compare the two."""
    global _c_loop
    _c_loop = on


@functools.lru_cache(maxsize=64)
def _row_ids(n: int) -> torch.Tensor:
    """arange(n), made once per row count (read-only: C reads it as each row's sequence)."""
    return torch.arange(n)


def attention_rows(meta: AttentionMetadata, num_tokens: int):
    """(block tables [S, W], sequence of each row [T], context each row sees [T]) when every
    token attends like a decode row (decodes, then chunks of at most MAX_ROW_CHUNK queries:
    verifications, short prompt chunks), else None. Built once per step."""
    if "attention_rows" in meta.derived:
        return meta.derived["attention_rows"]
    rows = None
    nd = meta.num_decodes
    if nd and not meta.prefills:  # decodes only: the tables and lengths as they are
        rows = (meta.decode_block_tables.contiguous(), _row_ids(nd),
                meta.decode_seq_lens.contiguous())
    elif (multi_row.is_row_invariant()
          or all(qlen <= native_attention.MAX_ROW_CHUNK for _, qlen, _, _ in meta.prefills)):
        tables = [meta.decode_block_tables] if nd else []
        seq = [torch.arange(nd)]
        ctx = [meta.decode_seq_lens] if nd else []
        for i, (_, qlen, ctx_len, block_ids) in enumerate(meta.prefills):
            tables.append(block_ids.unsqueeze(0))
            seq.append(torch.full((qlen,), nd + i, dtype=torch.long))
            # row j of the chunk sees the cache up to and including its own token
            ctx.append(torch.arange(ctx_len - qlen + 1, ctx_len + 1))
        width = max(t.shape[1] for t in tables)
        padded = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])
        rows = (padded.contiguous(), torch.cat(seq), torch.cat(ctx))
        assert rows[1].numel() == num_tokens
    meta.derived["attention_rows"] = rows
    return rows


class NativeDecoder:
    """Runs LlamaModel's decoder layers for decode-shaped steps (see the module docstring)."""

    def __init__(self, model):
        self.lib, self.abi = native_ops.lib(), native_ops.decode_abi()
        lo, hi = model.layer_range  # a pipeline stage's layers; all of them in one process
        first = model.layers[lo].self_attn
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.head_dim, self.q_size, self.kv_size = first.head_dim, first.q_size, first.kv_size
        self.scale, self.window = first.scale, first.sliding_window
        self.compute_dtype, self.hidden = model.compute_dtype, model.hidden_size
        # (a stage after the first has no embedding and gets its hidden states passed in; one
        # before the last has no final norm and passes its hidden states on, unnormed)
        self.embed, self.rotary, self.final_norm = model.embed_tokens, model.rotary, model.norm
        self.model = model  # its lora_context (set by the worker) says when adapters run
        # a tensor-parallel rank: the o and down projections give partial sums, added over the
        # ranks by the shared-memory all-reduce (in C, from decode_layers itself)
        self.tp = model.parallel.tp if model.parallel is not None else None
        self._all_reduce = self.tp.native_all_reduce() if self.tp is not None else None
        self.runs = {"c_loop": 0, "python_loop": 0}  # steps taken by each loop, for checks
        # plain lists: attribute access on nn.Modules costs ~1 us each
        self.layers = [(layer.input_layernorm, layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                        layer.post_attention_layernorm, layer.mlp.gate_up_proj,
                        layer.mlp.down_proj) for layer in model.layers[lo:hi]]
        self._kernel_cache: dict = {}
        self._write_calls: dict = {}  # id(cache list) -> (the list, its layers' write calls)
        self._plans: dict = {}  # (row count, kernel switches, id(cache list)) -> C loop words
        self._attention_ok: dict = {}  # id(cache list) -> (the list, C attention reads it)
        attention = native_attention.lib()
        self._c_calls = None if attention is None else tuple(
            function_address(fn) for fn in (attention.write_kv_rows, attention.paged_attn_rows))

    def usable(self, T: int, kv_caches, meta: AttentionMetadata) -> bool:
        if (self.lib is None or self.compute_dtype != torch.float32
                or (self.tp is not None and self._all_reduce is None)
                or (T > MAX_ROWS and not multi_row.is_row_invariant())
                or self.hidden % 16 or self.head_dim % 16):
            return False
        ok = self._attention_ok.get(id(kv_caches))
        if ok is None or ok[0] is not kv_caches:
            ok = (kv_caches, native_attention.supports(
                torch.empty(1, self.num_heads, self.head_dim), kv_caches[0][0]))
            if len(self._attention_ok) >= 4:
                self._attention_ok.clear()
            self._attention_ok[id(kv_caches)] = ok  # keeps the list, so its id is not reused
        return ok[1] and attention_rows(meta, T) is not None

    def _kernels(self, T: int):
        """Each layer's four projection kernels for T rows, or None if one has none. Bound once
        per row count (and kernel switch setting): binding all 120 costs ~1 ms."""
        key = (T, quant_kernels.dispatch_key())
        if key not in self._kernel_cache:
            self._kernel_cache[key] = self._bind_kernels(T)
        return self._kernel_cache[key]

    def _bind_kernels(self, T: int):
        out = []
        for _, qkv, o, _, gate_up, down in self.layers:
            ks = tuple(lin.quant_method.row_kernel(lin, T) for lin in (qkv, o, gate_up, down))
            if None in ks:
                return None
            out.append(ks)
        return out

    def _writes(self, kv_caches):
        """Each layer's K/V write call (None entries where C cannot write that cache), bound
        once per cache list: the runner keeps one list for the engine's life, and a
        self-speculation draft another (its first layers'), used in alternation."""
        bound = self._write_calls.get(id(kv_caches))
        if bound is None or bound[0] is not kv_caches:
            # the list itself is kept, so its id cannot be reused while the entry lives
            bound = (kv_caches, [native_attention.bind_write(kc, vc) for kc, vc in kv_caches])
            if len(self._write_calls) >= 4:
                self._write_calls.clear()
            self._write_calls[id(kv_caches)] = bound
        return bound[1]

    def _plan(self, T: int, kernels, kv_caches):
        """(int64 [layers, LAYER_WORDS] words of decode_layers, eps) for these kernels and
        caches, or None where a layer needs the Python loop (a bias, its own eps, a kernel
        without a C spec)."""
        lora = self.model.lora_context
        # LoRA slot tensors are in the plan by address: new or grown ones make a new plan
        key = (T, quant_kernels.dispatch_key(), id(kv_caches),
               0 if lora is None else lora.generation)
        plan = self._plans.get(key)
        if plan is None or plan[0] is not kv_caches:
            plan = (kv_caches, self._build_plan(kernels, kv_caches))
            if len(self._plans) >= 8:
                self._plans.clear()
            self._plans[key] = plan  # keeps the list, so its id is not reused meanwhile
        return plan[1]

    def _build_plan(self, kernels, kv_caches):
        n, abi = len(kv_caches), self.abi
        eps = self.layers[0][0].eps
        projections = (abi.L_QKV, abi.L_O, abi.L_GATE_UP, abi.L_DOWN)
        lora_words = (abi.L_LORA_QKV, abi.L_LORA_O, abi.L_LORA_GATE_UP, abi.L_LORA_DOWN)
        words = []
        for i, ((norm1, qkv, o, norm2, gate_up, down), ks, (kc, vc)) in \
                enumerate(zip(self.layers[:n], kernels, kv_caches)):
            specs = [getattr(k, "spec", None) for k in ks]
            kp, vp = native_attention.cache_parts(kc), native_attention.cache_parts(vc)
            if (None in specs or any(lin.bias is not None for lin in (qkv, o, gate_up, down))
                    or norm1.eps != eps or norm2.eps != eps
                    or self._norm_after(len(self.layers) - 1, len(self.layers)).eps != eps):
                return None
            row = [0] * abi.LAYER_WORDS
            row[abi.L_NORM2] = norm2.weight.data_ptr()
            row[abi.L_NORM_NEXT] = self._norm_after(i, n).weight.data_ptr()
            for at, (fn, kind, *args) in zip(projections, specs):
                assert abi.LIN_ARGS + len(args) <= abi.LIN_WORDS
                row[at + abi.LIN_FN], row[at + abi.LIN_KIND] = fn, getattr(abi, kind)
                row[at + abi.LIN_ARGS:at + abi.LIN_ARGS + len(args)] = args
            row[abi.L_K_CACHE], row[abi.L_V_CACHE] = kp[0].data_ptr(), vp[0].data_ptr()
            row[abi.L_K_SCALES] = kp[1].data_ptr() if kp[1] is not None else 0
            row[abi.L_V_SCALES] = vp[1].data_ptr() if vp[1] is not None else 0
            row[abi.L_CACHE_DTYPE] = kp[2]
            for at, lin in zip(lora_words, (qkv, o, gate_up, down)):
                if lin.lora is not None:
                    if lin.lora.desc is None:
                        return None  # slots C cannot read: the Python loop adds them
                    row[at] = lin.lora.desc.data_ptr()
            words.append(row)
        return torch.tensor(words, dtype=torch.int64), eps

    def _norm_after(self, i: int, n: int):
        """The norm applied to the residual stream after layer i of n: the next layer's input
        norm, or after the last layer run (of all, or a self-speculation draft's first n) the
        model's final norm."""
        if i + 1 < n:
            return self.layers[i + 1][0]
        # a stage before the last passes h on unnormed: any norm will do for the unused x
        return self.final_norm if self.final_norm is not None else self.layers[0][0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches,
                meta: AttentionMetadata, hidden_in: torch.Tensor | None = None):
        """Embeddings, decoder layers and final norm of a decode-shaped step: the normed hidden
        states [T, hidden], or None when the step does not qualify (see the module docstring;
        then the caller runs the module path). A pipeline stage after the first passes the
        previous stage's hidden states as `hidden_in`; a stage before the last gets its own
        back unnormed, for the next stage."""
        T, hidden = input_ids.shape[0], self.hidden
        if not self.usable(T, kv_caches, meta):
            return None
        kernels = self._kernels(T)
        if kernels is None:
            return None
        writes = self._writes(kv_caches)
        if None in writes:
            return None
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, qk_size = self.q_size, self.q_size + self.kv_size
        inter = self.layers[0][4].out_features // 2
        stride = qk_size + self.kv_size  # a qkv row
        # x (the output) first, then the residual stream h and the scratch buffers, in one
        # allocation: x, h, qkv, attn, o, gu, act
        widths = (hidden, hidden, stride, H * D, hidden, 2 * inter, inter)
        buf = torch.empty(T * sum(widths))
        ptrs, at = [], buf.data_ptr()
        for w in widths:
            ptrs.append(at)
            at += 4 * T * w  # fp32: 4 bytes per value
        x, h = buf[:T * hidden].view(T, hidden), buf[T * hidden:2 * T * hidden].view(T, hidden)
        p_x, p_h, p_qkv, p_attn, p_o, p_gu, p_act = ptrs
        p_k, p_v = p_qkv + 4 * q_size, p_qkv + 4 * qk_size
        kind = None
        if hidden_in is not None:
            h.copy_(hidden_in)
        else:
            weight = self.embed.weight
            # (a vocab-parallel table holds some rows only: its module gathers and all-reduces)
            if weight.is_contiguous() and type(self.embed) is torch.nn.Embedding:
                kind = _EMBED_KINDS.get(weight.dtype)
            if kind is None:  # a table C does not read: torch gathers the rows
                h.copy_(self.embed(input_ids))
        out = x if self.final_norm is not None else h
        tables, seq, ctx = attention_rows(meta, T)
        slots = meta.slot_mapping.contiguous()
        ids, positions = input_ids.contiguous(), positions.contiguous()
        n = len(kv_caches)  # fewer than all layers for a self-speculation draft
        lora = self.model.lora_context
        lora_step = lora.step if lora is not None else None
        # past MAX_C_ROWS rows with adapters, their terms are torch matmuls: the Python loop
        c_lora = lora_step is None or T <= lora_module.MAX_C_ROWS
        plan = (self._plan(T, kernels, kv_caches) if _c_loop and self._c_calls and c_lora
                else None)
        if plan is not None:
            abi, w = self.abi, [0] * self.abi.S_WORDS  # the step's words, by name
            w[abi.S_H], w[abi.S_X], w[abi.S_QKV], w[abi.S_ATTN] = p_h, p_x, p_qkv, p_attn
            w[abi.S_O], w[abi.S_GU], w[abi.S_ACT] = p_o, p_gu, p_act
            w[abi.S_T], w[abi.S_HIDDEN], w[abi.S_INTER] = T, hidden, inter
            w[abi.S_HEADS], w[abi.S_KVH], w[abi.S_D] = H, KVH, D
            w[abi.S_STRIDE], w[abi.S_QSIZE], w[abi.S_QKSIZE] = stride, q_size, qk_size
            w[abi.S_COS], w[abi.S_SIN] = self.rotary.cos.data_ptr(), self.rotary.sin.data_ptr()
            w[abi.S_POS], w[abi.S_SLOTS] = positions.data_ptr(), slots.data_ptr()
            w[abi.S_TABLES], w[abi.S_MAXB] = tables.data_ptr(), tables.shape[1]
            w[abi.S_SEQ], w[abi.S_CTX] = seq.data_ptr(), ctx.data_ptr()
            w[abi.S_BS], w[abi.S_WINDOW] = kv_caches[0][0].shape[1], self.window or 0
            w[abi.S_WRITE], w[abi.S_ATTEND] = self._c_calls
            w[abi.S_IDS] = ids.data_ptr()
            w[abi.S_EMBED] = 0 if kind is None else self.embed.weight.data_ptr()
            w[abi.S_EMBED_KIND] = abi.EMBED_NONE if kind is None else getattr(abi, kind)
            w[abi.S_NORM1] = self.layers[0][0].weight.data_ptr()
            # rows with an adapter: decode_layers adds each projection's LoRA term after it
            row_slots = lora_step.row_slots() if lora_step is not None else None
            w[abi.S_LORA_SLOTS] = 0 if row_slots is None else row_slots.data_ptr()
            if self._all_reduce is not None:
                w[abi.S_ALLREDUCE], w[abi.S_ALLREDUCE_CTX] = (self._all_reduce[0],
                                                              self._all_reduce[1].data_ptr())
            step = array.array("q", w)
            call = functools.partial(self.lib.decode_layers, plan[0].data_ptr(), n,
                                     step.buffer_info()[0], self.scale, plan[1])
            if self.tp is not None:
                self.tp.run_native(call)  # raises if a rank did not arrive
            else:
                call()
            self.runs["c_loop"] += 1
            return out
        # The same calls from Python (a layer with a qkv bias, LoRA rows, or the C loop off)
        self.runs["python_loop"] += 1
        lib = self.lib
        if kind is not None:  # else in h already
            h.copy_(self.embed(input_ids))
        # the buffers as [T, width] tensors: x, h, qkv, attn, o, gu, act
        views = [part.view(T, w) for part, w in
                 zip(buf.split([T * w for w in widths]), widths)]
        qkv, attn, o, gu, act = views[2:]
        cos, sin = (t.squeeze(1).contiguous() for t in self.rotary.cos_sin(positions))
        p_cos, p_sin = cos.data_ptr(), sin.data_ptr()
        lib.rms_norm_f32(p_h, self.layers[0][0].weight.data_ptr(), p_x, T, hidden,
                         self.layers[0][0].eps)
        for i, ((_, qkv_lin, o_lin, norm2, gu_lin, down_lin), (k_qkv, k_o, k_gu, k_down),
                (kc, vc)) in enumerate(zip(self.layers[:n], kernels, kv_caches)):
            k_qkv(p_x, p_qkv)
            if qkv_lin.bias is not None:
                qkv.add_(qkv_lin.bias)
            if lora_step is not None and qkv_lin.lora is not None:
                qkv_lin.lora.add_rows(x, qkv)
            lib.rope_f32(p_qkv, p_cos, p_sin, T, H + KVH, D, stride)
            writes[i](p_k, p_v, stride, slots.data_ptr(), T)
            native_attention.bind_rows(kc, vc, tables, seq, ctx, H, D, self.scale,
                                       self.window)(p_qkv, stride, p_attn, T)
            k_o(p_attn, p_o)
            if lora_step is not None and o_lin.lora is not None:
                o_lin.lora.add_rows(attn, o)
            if self.tp is not None:
                self.tp.all_reduce_(o)
            lib.add_rms_norm_f32(p_h, p_o, norm2.weight.data_ptr(), p_x, T, hidden, norm2.eps)
            k_gu(p_x, p_gu)
            if lora_step is not None and gu_lin.lora is not None:
                gu_lin.lora.add_rows(x, gu)
            lib.silu_mul_f32(p_gu, p_act, T, inter)
            k_down(p_act, p_o)
            if lora_step is not None and down_lin.lora is not None:
                down_lin.lora.add_rows(act, o)
            if self.tp is not None:
                self.tp.all_reduce_(o)
            after = self._norm_after(i, n)  # the residual add fused with the following norm
            lib.add_rms_norm_f32(p_h, p_o, after.weight.data_ptr(), p_x, T, hidden, after.eps)
        return out
