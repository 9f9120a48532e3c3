"""Our torch dequantization against gguf-py's independent numpy reference (`gguf.quants`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants

from turbollm.loader.gguf_dequant import (
    SUPPORTED_TYPES,
    dequantize,
    q4_0_unpack,
    q4_1_unpack,
    q8_0_unpack,
)

# Byte ranges of the fp16 fields inside one block, which random bytes could turn into NaN/inf.
FP16_FIELDS = {
    QT.Q8_0: [(0, 2)],
    QT.Q4_0: [(0, 2)],
    QT.Q4_1: [(0, 2), (2, 4)],
    QT.Q4_K: [(0, 2), (2, 4)],
    QT.Q6_K: [(208, 210)],
}


def random_raw(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid raw bytes uint8 [rows, bytes_per_row] for a [rows, cols] tensor."""
    rng = np.random.default_rng(seed)
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == QT.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == QT.BF16:
        f32 = rng.standard_normal((rows, cols), dtype=np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for lo, hi in FP16_FIELDS[qtype]:
        scales = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, lo:hi] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype):
    rows, cols = 6, 512  # two 256-blocks per row for K-quants, 16 for the 32-blocks
    raw = random_raw(qtype, rows, cols)
    ours = dequantize(qtype, raw, (rows, cols))
    ref = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_quantize_round_trip(qtype):
    x = np.random.default_rng(1).standard_normal((4, 256), dtype=np.float32)
    raw = quants.quantize(x, qtype)
    ours = dequantize(qtype, raw, x.shape)
    torch.testing.assert_close(ours, torch.from_numpy(quants.dequantize(raw, qtype)), rtol=0, atol=0)
    # and it is a faithful approximation of the input (4-bit: within ~one step of 2*amax/15)
    tol = {QT.Q4_0: 0.6, QT.Q4_1: 0.6, QT.Q8_0: 0.05}.get(qtype, 0.02)
    assert (ours - torch.from_numpy(x)).abs().max() < tol


def test_unpack_helpers_reconstruct_rows():
    rows, cols = 3, 96
    raw = random_raw(QT.Q4_1, rows, cols)
    q, d, m = q4_1_unpack(raw)
    assert q.shape == (rows, cols) and d.shape == m.shape == (rows, cols // 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.dtype == torch.float16
    x = q.float().reshape(rows, -1, 32) * d.float()[..., None] + m.float()[..., None]
    torch.testing.assert_close(x.reshape(rows, cols), dequantize(QT.Q4_1, raw, (rows, cols)), rtol=0, atol=0)
    # nibble order: value 1 of a block is the low nibble of byte 1, value 16 the high nibble of byte 0
    assert int(q[0, 1]) == int(raw[0, 5]) & 15 and int(q[0, 16]) == int(raw[0, 4]) >> 4

    raw = random_raw(QT.Q4_0, rows, cols)
    q, d = q4_0_unpack(raw)
    x = (q.float().reshape(rows, -1, 32) - 8) * d.float()[..., None]
    torch.testing.assert_close(x.reshape(rows, cols), dequantize(QT.Q4_0, raw, (rows, cols)), rtol=0, atol=0)

    raw = random_raw(QT.Q8_0, rows, cols)
    q, d = q8_0_unpack(raw)
    assert q.dtype == torch.int8 and q.shape == (rows, cols)
    x = q.float().reshape(rows, -1, 32) * d.float()[..., None]
    torch.testing.assert_close(x.reshape(rows, cols), dequantize(QT.Q8_0, raw, (rows, cols)), rtol=0, atol=0)


def test_unsupported_type_and_bad_size_raise():
    with pytest.raises(ValueError, match="Q5_K"):
        dequantize(QT.Q5_K, np.zeros(176, np.uint8), (256,))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(QT.Q8_0, np.zeros(33, np.uint8), (32,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_on_cuda_matches_cpu(qtype):
    raw = random_raw(qtype, 4, 512, seed=3)
    cpu = dequantize(qtype, raw, (4, 512))
    gpu = dequantize(qtype, torch.from_numpy(raw).cuda(), (4, 512))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
