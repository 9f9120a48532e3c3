"""The C paged decode attention against the PyTorch reference (gather + einsum) on random
inputs: fp32/bf16/fp16 caches, grouped heads, sliding windows, ragged lengths."""
import pytest
import torch

from turbollm.attention import native
from turbollm.attention.backend import AttentionMetadata
from turbollm.attention.torch_sdpa import TorchAttentionBackend

pytestmark = pytest.mark.skipif(native.lib() is None,
                                reason="no AVX2/FMA/F16C CPU or no C compiler")


def reference(q, kc, vc, tables, lens, scale, window, monkeypatch):
    meta = AttentionMetadata(slot_mapping=None, num_decodes=q.shape[0],
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[],
                             block_size=kc.shape[1])
    with monkeypatch.context() as m:
        m.setattr(native, "supports", lambda *a: False)  # force the torch path
        return TorchAttentionBackend._decode(q, kc, vc, meta, scale, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128),
                                                    (10, 2, 40), (4, 2, 16)])
@pytest.mark.parametrize("window", [None, 7, 40])
def test_matches_reference(dtype, heads, kv_heads, head_dim, window, monkeypatch):
    g = torch.Generator().manual_seed(heads * head_dim + (window or 0))
    nb, bs = 64, 16
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 2, 16, 17, 100, 255])
    tables = torch.stack([torch.randperm(nb, generator=g)[:16] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 3  # peaked softmaxes too
    scale = head_dim ** -0.5
    assert native.supports(q, kc)
    got = native.paged_attention_rows(q, kc, vc, tables, torch.arange(len(lens)), lens, scale,
                                      window)
    ref = reference(q, kc, vc, tables, lens, scale, window, monkeypatch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_rows_of_one_sequence_see_their_own_context(monkeypatch):
    """Several query rows may share a sequence (seq) with different visible lengths (ctx)."""
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(8, 4, 2, 16, generator=g)
    vc = torch.randn(8, 4, 2, 16, generator=g)
    tables = torch.tensor([[3, 1, 6, 0]])
    q = torch.randn(3, 4, 16, generator=g)
    lens = torch.tensor([5, 6, 13])
    got = native.paged_attention_rows(q, kc, vc, tables, torch.zeros(3, dtype=torch.long), lens,
                                      0.25, None)
    ref = reference(q, kc, vc, tables.expand(3, 4), lens, 0.25, None, monkeypatch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_unsupported_inputs_use_the_reference():
    q = torch.randn(2, 4, 12)  # head_dim not a multiple of 8
    assert not native.supports(q, torch.zeros(4, 4, 4, 12))
    assert not native.supports(torch.randn(2, 4, 16).bfloat16(), torch.zeros(4, 4, 4, 16))
    assert not native.supports(torch.randn(2, 4, 16), object())  # not a cache it knows


@pytest.mark.parametrize("window", [None, 5])
def test_backend_few_query_chunks_use_the_kernel_and_match(window, monkeypatch):
    """A speculative verification chunk (a few queries over a cached context) through the
    backend: the kernel's answer equals the reference path's."""
    g = torch.Generator().manual_seed(2)
    nb, bs, kvh, d, h = 16, 4, 2, 16, 6
    kc = torch.randn(nb, bs, kvh, d, generator=g)
    vc = torch.randn(nb, bs, kvh, d, generator=g)
    table = torch.tensor([5, 2, 9, 11, 0])
    qlen, ctx = 4, 17  # 13 cached tokens, 4 new
    q = torch.randn(qlen, h, d, generator=g)
    k = torch.randn(qlen, kvh, d, generator=g)
    v = torch.randn(qlen, kvh, d, generator=g)
    pos = torch.arange(ctx - qlen, ctx)
    slots = table[pos // bs] * bs + pos % bs

    def run():
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=0, decode_block_tables=None,
                                 decode_seq_lens=None, prefills=[(0, qlen, ctx, table)],
                                 block_size=bs)
        return TorchAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.25,
                                               window)
    calls = []
    real = native.paged_attention_rows
    monkeypatch.setattr(native, "paged_attention_rows",
                        lambda *a: calls.append(1) or real(*a))
    got = run()
    assert calls
    monkeypatch.setattr(native, "supports", lambda *a: False)
    torch.testing.assert_close(got, run(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("window", [None, 9])
def test_quantized_cache_matches_reference(kind, window, monkeypatch):
    """An int8 KV cache (per-token, per-head fp16 scales) or an fp8 e4m3 one is read in
    place (scales applied, fp8 widened exactly)."""
    from turbollm.attention.kv_quant import allocate_quant_kv_cache
    g = torch.Generator().manual_seed(3)
    nb, bs, kvh, d, h = 32, 16, 3, 64, 9
    cache = allocate_quant_kv_cache(1, nb, bs, kvh, d, kind, "cpu")
    kc, vc = cache.layer_views()[0]
    slots = torch.arange(nb * bs)
    kc.write(torch.randn(nb * bs, kvh, d, generator=g) * 2, slots)
    vc.write(torch.randn(nb * bs, kvh, d, generator=g), slots)
    lens = torch.tensor([1, 15, 64, 130])
    tables = torch.stack([torch.randperm(nb, generator=g)[:9] for _ in lens])
    q = torch.randn(len(lens), h, d, generator=g)
    assert native.supports(q, kc)
    got = native.paged_attention_rows(q, kc, vc, tables, torch.arange(len(lens)), lens, 0.125,
                                      window)
    ref = reference(q, kc, vc, tables, lens, 0.125, window, monkeypatch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, torch.float16, "int8",
                                  "fp8_e4m3"])
def test_c_kv_write_stores_the_bytes_torch_stores(kind, monkeypatch):
    """The decode-sized C write of new K/V rows converts exactly as torch does (bf16/fp16/fp8
    round to nearest even, int8 scale and rounding as QuantKV.write, fp8 clamped to +-448),
    from strided rows as the decoder hands them over (views into the fused qkv output)."""
    from turbollm.attention import torch_sdpa
    from turbollm.attention.kv_quant import allocate_quant_kv_cache

    g = torch.Generator().manual_seed(7)
    T, kvh, d = 5, 3, 64
    qkv = torch.randn(T, 4 * kvh * d, generator=g) * 10
    qkv[0, 2 * kvh * d:3 * kvh * d] = 0.0  # an all-zero K row (int8 scale 0)
    qkv[1, 2 * kvh * d] = 1.0 + 2 ** -8  # a bf16 tie: rounds to even
    qkv[2, 2 * kvh * d + 1] = -0.0
    # fp8: beyond +-448, the subnormal range (steps of 2^-9) and its ties, a tie between
    # normals (1 + 1/16 lies halfway between 1 and 1.125), the largest subnormal rounding up
    qkv[3, 2 * kvh * d:2 * kvh * d + 8] = torch.tensor(
        [1000.0, -500.0, 3 * 2 ** -10, 5 * 2 ** -10, 1 + 2 ** -4, 1 + 3 * 2 ** -4,
         2 ** -6 - 2 ** -11, 1e-12])
    k = qkv[:, 2 * kvh * d:3 * kvh * d].view(T, kvh, d)
    v = qkv[:, 3 * kvh * d:].view(T, kvh, d)
    slots = torch.tensor([17, 3, 40, 41, 0])

    def caches():
        if isinstance(kind, str):
            return allocate_quant_kv_cache(1, 4, 16, kvh, d, kind, "cpu").layer_views()[0]
        return (torch.zeros(4, 16, kvh, d, dtype=kind), torch.zeros(4, 16, kvh, d, dtype=kind))

    def raw(c):
        return [c.data, c.scale] if kind == "int8" else [c.data] if kind == "fp8_e4m3" else [c]

    kc, vc = caches()
    assert native.write_kv(k, v, kc, vc, slots)
    with monkeypatch.context() as m:
        m.setattr(native, "write_kv", lambda *a: False)  # the torch path
        kr, vr = caches()
        torch_sdpa.write_kv(k, v, kr, vr, slots)
    for got, ref in zip(raw(kc) + raw(vc), raw(kr) + raw(vr)):
        if kind == "int8" and got.dtype == torch.int8:
            # a zero-scale row may hold any q (torch: 0/0 -> NaN -> undefined cast); it reads 0
            got, ref = got.clone(), ref.clone()
            got.view(-1, kvh, d)[17, 0] = ref.view(-1, kvh, d)[17, 0] = 0
        assert torch.equal(got.view(torch.uint8) if got.dtype != torch.uint8 else got,
                           ref.view(torch.uint8) if ref.dtype != torch.uint8 else ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 300])
def test_long_contexts_split_into_parts_match_reference(dtype, window, monkeypatch):
    """Contexts over 256 tokens are attended in parts merged by log-sum-exp; a row's bits do
    not depend on the other rows of the call (spec verification vs plain decoding)."""
    g = torch.Generator().manual_seed(11)
    nb, bs, kvh, d = 160, 16, 3, 64
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    lens = torch.tensor([257, 600, 1000, 40, 513])
    tables = torch.stack([torch.randperm(nb, generator=g)[:64] for _ in lens])
    q = torch.randn(len(lens), 9, d, generator=g) * 3
    got = native.paged_attention_rows(q, kc, vc, tables, torch.arange(len(lens)), lens,
                                      d ** -0.5, window)
    ref = reference(q, kc, vc, tables, lens, d ** -0.5, window, monkeypatch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
    for r in range(len(lens)):
        alone = native.paged_attention_rows(q[r:r + 1], kc, vc, tables[r:r + 1],
                                            torch.zeros(1, dtype=torch.long), lens[r:r + 1],
                                            d ** -0.5, window)
        assert torch.equal(alone[0], got[r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("last", [7, 250, 262, 700])
def test_rows_of_one_sequence_share_an_item_with_the_bits_of_each_row_alone(dtype, window, last,
                                                                            monkeypatch):
    """A verification step's rows (one sequence, contexts last - 8 .. last, some of them split
    into parts where others are not) attend in shared work items; each row's output must have
    the bits of the same row attended alone, as plain decoding computes it."""
    g = torch.Generator().manual_seed(last)
    nb, bs, kvh, d = 64, 16, 3, 64
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[:48].unsqueeze(0)
    lens = torch.arange(max(1, last - 8), last + 1)
    q = torch.randn(len(lens), 9, d, generator=g) * 3
    seq = torch.zeros(len(lens), dtype=torch.long)
    native.lib().paged_attn_force_item_rows(16)  # all rows of a part count in one item
    try:
        got = native.paged_attention_rows(q, kc, vc, tables, seq, lens, d ** -0.5, window)
    finally:
        native.lib().paged_attn_force_item_rows(0)
    ref = reference(q, kc, vc, tables.expand(len(lens), -1), lens, d ** -0.5, window,
                    monkeypatch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=5e-6)
    for r in range(len(lens)):
        alone = native.paged_attention_rows(q[r:r + 1], kc, vc, tables, seq[:1], lens[r:r + 1],
                                            d ** -0.5, window)
        assert torch.equal(alone[0], got[r])
