"""layers/lora.py: adapter slots on one linear layer, over every base weight type, against the
plain per-row formula y = base(x) + (x A^T) B^T."""
from __future__ import annotations

import pytest
import torch

from turbollm.layers.linear import QKVLinear, ReplicatedLinear
from turbollm.layers.lora import LinearLoRA, LoRAContext, LoRAStep
from turbollm.quantization.methods import get_method

IN, Q, KV = 64, 64, 32


def test_step_groups_rows_by_slot():
    # decode rows 0..3 (slots 1, -1, 1, 0), then prompt chunks [4, 9) slot 0, [9, 12) slot 0
    spans = [(0, 1, 1), (1, 1, -1), (2, 1, 1), (3, 1, 0), (4, 5, 0), (9, 3, 0)]
    step = LoRAStep.from_spans(spans, torch.device("cpu"))
    groups = dict(step.groups)
    assert set(groups) == {0, 1}
    assert groups[1].tolist() == [0, 2]  # interleaved: gathered by index
    assert groups[0] == slice(3, 12)  # a decode row and two chunks, adjacent: one slice
    assert LoRAStep.from_spans([(0, 4, -1), (4, 2, -1)], torch.device("cpu")) is None


def _layer(kind: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if method == "bf16" else torch.float32
    layer = (QKVLinear(IN, Q, KV, dtype=dtype) if kind == "qkv"
             else ReplicatedLinear(IN, 48, dtype=dtype))
    layer.weight.data.normal_(0, 0.1)
    if method not in ("fp32", "bf16"):
        get_method(method).create_weights(layer, 32)
    return layer


def _factors(layer, shard, r, seed):
    g = torch.Generator().manual_seed(seed)
    rows = layer.shard_offset(shard)[1]
    return (torch.randn(r, IN, generator=g) * 0.2, torch.randn(rows, r, generator=g) * 0.2)


@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("kind", ["qkv", "single"])
def test_lora_term_on_every_weight_type(kind, method):
    layer = _layer(kind, method)
    shards = ["q", "k", "v"] if kind == "qkv" else [None]
    ctx = LoRAContext()
    layer.lora = LinearLoRA(layer, shards, num_slots=3, rank=8, context=ctx,
                            dtype=torch.float32, device=torch.device("cpu"))
    # slot 0: rank 8 on every shard; slot 2: rank 4 on the first shard only (the others zero)
    factors = {0: {s: _factors(layer, s, 8, i) for i, s in enumerate(shards)},
               2: {shards[0]: _factors(layer, shards[0], 4, 9)}}
    for slot, per_shard in factors.items():
        for s in shards:
            a, b = per_shard.get(s, (None, None))
            layer.lora.set_shard(slot, s, a, b)
    x = torch.randn(12, IN, generator=torch.Generator().manual_seed(5))
    row_slots = [0, -1, 2, 0] + [2] * 5 + [-1] * 3  # 4 decode rows, then two chunks
    spans = [(0, 1, 0), (1, 1, -1), (2, 1, 2), (3, 1, 0), (4, 5, 2), (9, 3, -1)]
    with torch.inference_mode():
        base = layer.quant_method.apply(layer, x).clone()
        ctx.step = LoRAStep.from_spans(spans, torch.device("cpu"))
        got = layer(x)
        ctx.step = None
        plain = layer(x)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)  # no step: nothing added
    expected = base.clone()
    for t, slot in enumerate(row_slots):
        for s, (a, b) in factors.get(slot, {}).items():
            off, rows = layer.shard_offset(s)
            expected[t, off:off + rows] += (x[t] @ a.T) @ b.T
    assert (expected - base).abs().max() > 0.1  # the adapters do change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grow_keeps_slots_and_fits_larger_rank():
    layer = _layer("qkv", "fp32")
    ctx = LoRAContext()
    lora = layer.lora = LinearLoRA(layer, ["q", "k", "v"], num_slots=2, rank=4, context=ctx,
                                   dtype=torch.float32, device=torch.device("cpu"))
    a, b = _factors(layer, "k", 4, 1)
    lora.set_shard(1, "k", a, b)
    x = torch.randn(3, IN)
    ctx.step = LoRAStep.from_spans([(0, 3, 1)], torch.device("cpu"))
    with torch.inference_mode():
        before = layer(x)
        lora.grow(16)
        assert lora.rank == 16 and lora.A.shape == (2, 48, IN) and lora.B.shape == (2, 16, 128)
        torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
        a16, b16 = _factors(layer, "v", 16, 2)
        lora.set_shard(0, "v", a16, b16)  # rank 16 now fits; the other slot is untouched
        torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        lora.set_shard(0, "q", *_factors(layer, "q", 17, 3))


# 5 rows: the shrunk rows on the stack; 40 (a decode batch): on the heap
_SPANS = {5: [(0, 1, 1), (1, 1, -1), (2, 1, 0), (3, 2, 1)],
          40: [(t, 1, (-1, 0, 1)[t * 7 % 3]) for t in range(36)] + [(36, 4, 0)]}


@pytest.mark.parametrize("T", sorted(_SPANS))
@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qkv", "single"])
def test_c_rows_kernel_matches_torch(kind, slot_dtype, T):
    """add_rows (one C call, used by the native decoder) against add_to (torch), on rows of
    mixed slots and an output that is a view of a wider buffer, at a rank that is not a
    multiple of 8 (nor of 4), with fp32 and bf16 factors (both read the same stored values).
    Slot 1 holds a smaller adapter (rank 6 in rank-10 slots) that leaves v untargeted: the C
    kernel reads only each shard's real rank, so padding poisoned with NaN after the torch
    reference changes nothing."""
    from turbollm.layers import native_ops
    if native_ops.lib() is None:
        pytest.skip("no C kernels on this CPU")
    layer = _layer(kind, "fp32")
    shards = ["q", "k", "v"] if kind == "qkv" else [None]
    ctx = LoRAContext()
    lora = LinearLoRA(layer, shards, num_slots=2, rank=10, context=ctx, dtype=slot_dtype,
                      device=torch.device("cpu"))  # 10 and 30: tails after 4 and 8 lanes
    for slot in (0, 1):
        for i, s in enumerate(shards):
            untargeted = slot == 1 and s == "v"
            lora.set_shard(slot, s, *((None, None) if untargeted
                                      else _factors(layer, s, 10 - 4 * slot, 10 * slot + i)))
    want_ranks = [[10] * len(shards), [6, 6, 0] if kind == "qkv" else [6]]
    assert lora.ranks.tolist() == want_ranks
    out = layer.out_features
    x = torch.randn(T, IN)
    ctx.step = LoRAStep.from_spans(_SPANS[T], torch.device("cpu"))
    buf = torch.randn(T, out + 16)  # y: the first `out` columns of each row
    want = buf.clone()
    lora.add_to(x, want[:, :out])
    with torch.inference_mode():  # poison the padding: the C kernel must not read it
        for slot in (0, 1):
            for j, (off, rows) in enumerate(lora.spans):
                rk = want_ranks[slot][j]
                lora.A[slot, j * 10 + rk:(j + 1) * 10] = float("nan")
                lora.B[slot, rk:, off:off + rows] = float("nan")
    got = buf.clone()
    lora.add_to = lambda *a: pytest.fail("add_rows fell back to torch")  # the C path must run
    lora.add_rows(x, got[:, :out])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if slot_dtype == torch.bfloat16:
        assert lora.desc is not None  # the native decoder's words describe bf16 slots too
    base = ctx.step.row_slots() < 0  # rows without an adapter, and the columns past `out`
    assert base.any() and (got - buf)[base].abs().max() == 0
    assert (got - buf)[:, out:].abs().max() == 0
    assert (got - buf).abs().max() > 0.1
