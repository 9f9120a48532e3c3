"""The CUDA LoRA kernels (layers/lora_triton.py), run by Triton's interpreter on CPU tensors,
against the plain per-row reference: mixed adapters and base rows in one batch, fused shards
(q | k | v), ranks and widths that are not multiples of the tiles."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (make test installs it)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("T,K,spans,R,dtype", [
    (5, 96, [(0, 64), (64, 32), (96, 32)], 8, torch.float32),  # q | k | v
    (3, 130, [(0, 70)], 16, torch.float32),  # one shard, K and N off the tiles
    (4, 64, [(0, 40), (40, 40)], 4, torch.bfloat16),  # gate | up, bf16 activations
])
def test_matches_the_per_row_reference(T, K, spans, R, dtype):
    from turbollm.layers import lora_triton
    torch.manual_seed(0)
    N, S = sum(n for _, n in spans), 3
    A = torch.randn(S, len(spans) * R, K) * 0.1
    B = torch.randn(S, R, N) * 0.1  # [slots, R, out], as LinearLoRA keeps it
    x = torch.randn(T, K).to(dtype)
    y = torch.randn(T, N).to(dtype)
    slots = torch.tensor([2, -1, 0, 2, 1, -1, 0][:T])
    want = y.float().clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        shrunk = A[slot] @ x[t].float()
        for j, (off, n) in enumerate(spans):
            want[t, off:off + n] += shrunk[j * R:(j + 1) * R] @ B[slot, :, off:off + n]
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = lora_triton.lora_add(dev(x), dev(y), dev(A), dev(B), dev(slots),
                               lora_triton.output_shards(spans, N, DEVICE), R)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
    base_rows = slots < 0
    assert torch.equal(got.cpu()[base_rows], y[base_rows])  # base rows untouched
