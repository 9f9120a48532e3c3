"""The C RMSNorm, SiLU-and-mul and rotary kernels against their torch references."""
import pytest
import torch
import torch.nn.functional as F

from turbollm.layers import native_ops
from turbollm.layers.activation import silu_and_mul
from turbollm.layers.layernorm import RMSNorm
from turbollm.layers.rotary import RotaryEmbedding, _rotate

pytestmark = pytest.mark.skipif(native_ops.lib() is None,
                                reason="no AVX2/FMA CPU or no C compiler")


@pytest.mark.parametrize("rows,dim", [(1, 576), (7, 64), (32, 1024)])
def test_rms_norm(rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=g) * 3
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=g)
    assert native_ops.usable(x)
    ref = F.rms_norm(x, (dim,), norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 64)])
def test_silu_and_mul(rows, inter):
    g = torch.Generator().manual_seed(inter)
    gu = torch.randn(rows, 2 * inter, generator=g) * 6  # into exp's clamped range too
    gu[0, 0], gu[0, 1] = 100.0, -100.0
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert native_ops.usable(gu)
    torch.testing.assert_close(silu_and_mul(gu), ref, rtol=1e-5, atol=1e-5)


def test_rope_in_place_on_a_strided_view():
    g = torch.Generator().manual_seed(0)
    rot = RotaryEmbedding(64, 256, 10000.0)
    T, heads, kvh = 3, 9, 3
    qkv = torch.randn(T, (heads + 2 * kvh) * 64, generator=g)
    qk = qkv[:, :(heads + kvh) * 64].view(T, heads + kvh, 64)  # rows strided, as in the model
    cos_sin = rot.cos_sin(torch.tensor([0, 17, 200]))
    ref = _rotate(qk.clone(), *cos_sin)
    v_before = qkv[:, (heads + kvh) * 64:].clone()
    got = RotaryEmbedding.apply(cos_sin, qk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, (heads + kvh) * 64:], v_before, rtol=0, atol=0)


def test_large_or_non_fp32_inputs_use_torch():
    assert not native_ops.usable(torch.zeros(512, 1536))  # prefill-sized
    assert not native_ops.usable(torch.zeros(1, 576, dtype=torch.bfloat16))
    assert not native_ops.usable(torch.zeros(1, 72))  # not a multiple of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,n,k", [(1, 960, 576), (3, 7, 64), (8, 130, 1536), (16, 33, 72),
                                      (37, 131, 64), (128, 96, 576)])
def test_dense_linear_matches_torch_reference(rows, n, k, dtype, monkeypatch):
    from turbollm.layers import prefill_gemm
    from turbollm.layers.linear import ReplicatedLinear
    monkeypatch.setattr(prefill_gemm, "_bf16", False)  # (with it, bf16 weights leave C sooner)
    g = torch.Generator().manual_seed(n)
    layer = ReplicatedLinear(k, n, bias=True, dtype=dtype)
    layer.weight.data = torch.randn(n, k, generator=g).to(dtype)
    layer.bias.data = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    assert native_ops.dense_linear_usable(x, layer.weight)
    ref = F.linear(x, layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


def test_dense_linear_rows_do_not_depend_on_the_batch():
    # speculative verification (several rows) must reproduce plain decode (one row) bit for bit
    g = torch.Generator().manual_seed(0)
    # (tiles of 4 rows and blocks of 3 weight rows: 101 outputs leave a remainder row, 67 rows
    # end with a partial tile)
    for wdtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(101, 576, generator=g).to(wdtype)
        x = torch.randn(67, 576, generator=g)
        together = native_ops.dense_linear(x, w)
        for i in range(67):
            assert torch.equal(native_ops.dense_linear(x[i:i + 1], w)[0], together[i])
        assert torch.equal(native_ops.dense_linear(x[5:12], w), together[5:12])


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (3, 1000), (2, 7)])
def test_argmax_rows_matches_torch(rows, vocab):
    torch.manual_seed(0)
    x = torch.randn(rows, vocab)
    x[0, vocab // 3] = x[0, vocab - 1] = x.max() + 1  # a tie: the first index wins
    if rows > 1:
        x[1] = float("-inf")
        x[1, vocab - 1] = 0.0  # the only finite value, in the tail past the last 8 values
    assert native_ops.argmax_rows(x) == x.argmax(dim=-1).tolist()


def test_argmax_rows_leaves_nan_rows_to_torch():
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    assert native_ops.argmax_rows(x) is None
    assert native_ops.argmax_rows(x[:1]) == [int(x[0].argmax())]


@pytest.mark.parametrize("bf16_gemm", [False, True])
def test_dense_rows_go_to_the_faster_kernel(bf16_gemm):
    """Where prefill-sized products run in bf16, bf16 weights leave our C kernel past a few
    rows (oneDNN's bf16 GEMM is faster there), small layers past 16; else past MAX_DENSE_ROWS.
    Row-invariant products keep it at any row count, and other weight dtypes keep it."""
    from turbollm.layers import prefill_gemm
    small = torch.zeros(576, 576, dtype=torch.bfloat16)
    large = torch.zeros(2048, 2048, dtype=torch.bfloat16)
    was = prefill_gemm.in_bf16()
    prefill_gemm.use_bf16(bf16_gemm)
    try:
        limits = {id(small): native_ops.MAX_DENSE_ROWS_BF16_GEMM_SMALL,
                  id(large): native_ops.MAX_DENSE_ROWS_BF16_GEMM} if bf16_gemm else {}
        for w in (small, large):
            limit = limits.get(id(w), native_ops.MAX_DENSE_ROWS)
            assert native_ops.dense_row_kernel(w, limit) is not None
            assert native_ops.dense_row_kernel(w, limit + 1) is None
            assert not native_ops.dense_linear_usable(torch.zeros(limit + 1, w.shape[1]), w)
            with prefill_gemm.row_invariant():
                assert native_ops.dense_row_kernel(w, 4 * native_ops.MAX_DENSE_ROWS) is not None
            assert native_ops.dense_row_kernel(w.float(), native_ops.MAX_DENSE_ROWS) is not None
    finally:
        prefill_gemm.use_bf16(was)
