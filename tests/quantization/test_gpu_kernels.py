"""The CUDA (Triton) int4 / int8 kernels, run by Triton's interpreter on CPU tensors, against
their dequantize-then-matmul reference. The interpreter executes the same kernel source a GPU
compiles, so tile, mask and nibble-order mistakes show here; speed is measured on a GPU only."""
from __future__ import annotations

import pytest
import torch

from turbollm.quantization import kernels
from turbollm.quantization.int4 import dequantize_int4, quantize_int4_rtn
from turbollm.quantization.int8 import dequantize_int8, quantize_int8

pytest.importorskip("triton", reason="Triton is not installed (make test installs it)")


# Without a GPU, conftest.py has set TRITON_INTERPRET=1 before anything imported triton, and the
# kernels run on CPU tensors; with one, they are compiled and run on it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gk():
    from turbollm.quantization import gpu_kernels
    return gpu_kernels


def _on(state):
    return kernels.state_to(state, DEVICE)


def _int4_state(n, k, g, minform, seed=0):
    torch.manual_seed(seed)
    if minform:  # GGUF Q4_1's (q, scale, min) form
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        s = (torch.rand(n, k // g) * 0.02).half().float()
        mn = (torch.randn(n, k // g) * 0.1).half().float()
        cols = torch.arange(k) // g
        return kernels.int4_pack_minform(q, s, mn, g), q.float() * s[:, cols] + mn[:, cols]
    q, s, z = quantize_int4_rtn(torch.randn(n, k) * 0.05, g)
    return kernels.int4_pack(q, s, z, g), dequantize_int4(q, s, z, g)


# shapes cover both kernels (row kernel up to ROW_KERNEL_MAX_ROWS rows, tile kernel above), a
# row count and N below one tile, N not a multiple of BN, K ending inside a slice (96, 576),
# groups shorter than a slice (32), a shorter last group (576 / 128) and a group of 3 blocks
# (96: not a power of two, so even one row takes the tile kernel)
@pytest.mark.parametrize("M,N,K,G,minform", [
    (1, 48, 96, 32, True), (3, 70, 576, 128, False), (2, 130, 192, 64, True),
    (1, 40, 192, 96, False), (5, 70, 576, 128, False), (17, 64, 256, 64, False),
    (33, 130, 192, 32, True)])
def test_int4_kernel_matches_reference(gk, M, N, K, G, minform):
    state, w = _int4_state(N, K, G, minform)
    x = torch.randn(M, K)
    state = _on(state)
    for y in (gk.int4_linear(x.to(DEVICE), state), gk.widened_int4(x.to(DEVICE), state)):
        torch.testing.assert_close(y.cpu(), x @ w.t(), rtol=1e-4, atol=1e-4)
    # the one-pass widening kernel and the torch ops without Triton give the weight itself
    for widen in (gk.widen_int4, gk.widen_int4_torch):
        torch.testing.assert_close(widen(state, torch.float32).cpu(), w, rtol=1e-6, atol=1e-7)


def test_int4_kernel_in_half_precision(gk):
    state, w = _int4_state(64, 256, 64, False)
    x = torch.randn(7, 256).half()
    y = gk.int4_linear(x.to(DEVICE), _on(state)).cpu()
    assert y.dtype == torch.float16
    # weights widened to fp16 in the kernel, fp32 accumulation
    ref = x.float() @ w.half().float().t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("M,N,K,G", [(1, 40, 64, 64), (1, 100, 576, 32), (3, 100, 576, 32),
                                     (9, 100, 576, 576), (20, 64, 96, 32)])
def test_int8_kernel_matches_reference(gk, M, N, K, G):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    if G == K:
        q, s = quantize_int8(w)
        state, ref_w = kernels.int8_pack(q, s), dequantize_int8(q, s)
    else:  # GGUF Q8_0's one scale per 32 columns
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        s = torch.rand(N, K // G) * 0.01
        state = kernels.int8_pack(q, s, G)
        ref_w = (q.float().reshape(N, -1, G) * s[:, :, None]).reshape(N, K)
    x = torch.randn(M, K)
    state = _on(state)
    for y in (gk.int8_linear(x.to(DEVICE), state), gk.widened_int8(x.to(DEVICE), state)):
        torch.testing.assert_close(y.cpu(), x @ ref_w.t(), rtol=1e-4, atol=1e-4)
    for widen in (gk.widen_int8, gk.widen_int8_torch):
        got = widen(state.qweight, state.scales, G, torch.float32).cpu()
        torch.testing.assert_close(got, ref_w, rtol=1e-6, atol=1e-7)


def test_row_kernels_serve_a_few_rows_and_tiles_the_rest(gk, monkeypatch):
    launched = []
    real = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda kernel, name, *a, **k:
                        launched.append(name) or real(kernel, name, *a, **k))
    state4 = _on(_int4_state(32, 64, 32, False)[0])
    q, s = quantize_int8(torch.randn(32, 64))
    state8 = _on(kernels.int8_pack(q, s))
    monkeypatch.setattr(gk, "ROW_KERNEL_MAX_ROWS", {"int4": 2, "bytes": 1})
    for m in (1, 2, 3):
        gk.int4_linear(torch.randn(m, 64).to(DEVICE), state4)
        gk.int8_linear(torch.randn(m, 64).to(DEVICE), state8)
    assert launched == ["int4_rows", "bytes_rows", "int4_rows", "int8_dot", "int4_dot",
                        "int8_dot"]


def test_tuned_tiles_load_from_a_file(gk, monkeypatch, tmp_path):
    import json
    monkeypatch.setattr(gk, "TILE_CONFIG", {k: dict(v) for k, v in gk.TILE_CONFIG.items()})
    monkeypatch.setattr(gk, "ROW_KERNEL_MAX_ROWS", dict(gk.ROW_KERNEL_MAX_ROWS))
    monkeypatch.setattr(gk, "WIDEN_FROM_ROWS", gk.WIDEN_FROM_ROWS)
    tuned = {"int4_rows": dict(BN=8, BK=256, num_warps=2, num_stages=1),
             "row_kernel_max_rows": {"int4": 3}, "widen_from_rows": 64}
    (tmp_path / "t.json").write_text(json.dumps(tuned))
    gk.load_tile_config(str(tmp_path / "t.json"))
    assert gk.TILE_CONFIG["int4_rows"] == tuned["int4_rows"]
    assert gk.ROW_KERNEL_MAX_ROWS == {"int4": 3, "bytes": 1} and gk.WIDEN_FROM_ROWS == 64
    state, w = _int4_state(40, 128, 32, False)
    x = torch.randn(3, 128)  # 3 rows: now the row kernel, with the file's tiles
    torch.testing.assert_close(gk.int4_linear(x.to(DEVICE), _on(state)).cpu(), x @ w.t(),
                               rtol=1e-4, atol=1e-4)
    (tmp_path / "bad.json").write_text(json.dumps({"int5_rows": {}}))
    with pytest.raises(ValueError, match="unknown kernel 'int5_rows'"):
        gk.load_tile_config(str(tmp_path / "bad.json"))


def test_cpu_states_never_reach_the_gpu_kernels(monkeypatch, gk):
    """CPU states keep the C kernels; a GPU state's call goes to gpu_kernels (checked here by
    the dispatch predicate, as no GPU is at hand)."""
    state, _ = _int4_state(32, 64, 32, False)
    assert kernels._on_cpu(state.packed)
    called = []
    monkeypatch.setattr(gk, "int4_linear", lambda x, s: called.append(1))
    kernels.int4_linear(torch.randn(1, 64), state)
    assert not called


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the kernels are checked "
                    "in Triton's interpreter above")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_model_on_cuda_matches_cpu(method, tiny_llama):
    from turbollm import LLM, SamplingParams
    params = SamplingParams(max_tokens=8, temperature=0)
    outs = []
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_llama), dtype="float32", device=device, quantization=method,
                  kv_cache_memory="8MiB")
        layer = llm.engine.executor.worker.runner.model.model.layers[0].mlp.down_proj
        state = getattr(layer, f"{method}_state")
        assert next(t for t in vars(state).values() if torch.is_tensor(t)).device.type == device
        outs.append(llm.generate(["Hello there"], params)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_prefill_sized_inputs_take_the_widened_matmul(gk, monkeypatch):
    state, w = _int4_state(32, 64, 32, False)
    state = _on(state)
    widened = []
    real = gk.widened_int4
    monkeypatch.setattr(gk, "widened_int4", lambda x, s: widened.append(x.shape[0]) or real(x, s))
    x = torch.randn(gk.WIDEN_FROM_ROWS, 64)
    torch.testing.assert_close(gk.int4_linear(x.to(DEVICE), state).cpu(), x @ w.t(),
                               rtol=1e-4, atol=1e-4)
    gk.int4_linear(x[:3].to(DEVICE), state)
    assert widened == [gk.WIDEN_FROM_ROWS]  # the 3-row call ran the Triton kernel
