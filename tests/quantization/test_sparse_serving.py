"""Pruned weights served through the bitmask kernels: a magnitude-pruned tiny model stored
sparse (compressed-tensors) gets SparseBitmaskMethod by default (SparseInt8Method under
--quantization int8), its decode steps run the C decode loop with LIN_SPARSE (LIN_SPARSE_Q8)
projections, and its greedy tokens and logprobs match the same weights served dense."""
from __future__ import annotations

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.quantization import sparse
from turbollm.quantization.sparse_method import (SparseBitmaskMethod, SparseInt8Method,
                                                 install_sparse)

pytestmark = pytest.mark.skipif(sparse.lib() is None, reason="no C kernels on this CPU")


def _prune(tiny_llama, tmp_path_factory, *how: str):
    """The tiny model pruned by magnitude as `how` says, stored sparse."""
    from turbollm.cli import main
    out = tmp_path_factory.mktemp("pruned") / "m"
    assert main(["prune", str(tiny_llama), "--method", "magnitude", *how,
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(tiny_llama, tmp_path_factory):
    return _prune(tiny_llama, tmp_path_factory, "--sparsity", "0.5")


@pytest.fixture(scope="module")
def pruned_24(tiny_llama, tmp_path_factory):
    return _prune(tiny_llama, tmp_path_factory, "--pattern", "2:4")


def _sparse_layer(n_in: int, n_out: int, zeros: float):
    """An fp32 linear layer of random weights with about `zeros` of them zero (seed 0)."""
    from turbollm.layers.linear import LinearBase
    torch.manual_seed(0)
    layer = LinearBase(n_in, n_out, bias=False, dtype=torch.float32)
    with torch.no_grad():
        w = torch.randn(n_out, n_in)
        w[torch.rand(n_out, n_in) < zeros] = 0
        layer.weight.copy_(w)
    return layer


def _llm(path, **kw):
    return LLM(model=str(path), dtype="float32", kv_cache_memory="8MiB", num_threads=1, **kw)


def _plan_kinds(model) -> set[int]:
    """The call kinds of the qkv projections in the C decode loop's plans so far."""
    decoder = model.model.native_decoder
    abi = decoder.abi
    return {int(words[0][abi.L_QKV + abi.LIN_KIND]) for _, (words, _) in
            ((k, p[1]) for k, p in decoder._plans.items() if p[1] is not None)}


def _assert_same_greedy(got_llm, want_llm, logprob_tol):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    prompts = [[1, 300, 42, 9000, 7], [1, 5, 6]]
    got = got_llm.generate(prompts, params, use_tqdm=False)
    want = want_llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.sampled.logprob == pytest.approx(b.sampled.logprob, abs=logprob_tol)


def test_stored_sparse_checkpoint_decodes_through_the_bitmask_kernel(pruned):
    sparse_llm, dense_llm = _llm(pruned), _llm(pruned, sparsity="none")
    model = sparse_llm.engine.executor.worker.model
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.quant_method, SparseBitmaskMethod)
    assert not isinstance(model.lm_head.quant_method, SparseBitmaskMethod)
    assert layer.quant_method.row_kernel(layer, 1).spec[1] == "LIN_SPARSE"
    assert not isinstance(dense_llm.engine.executor.worker.model.model.layers[0].self_attn
                          .qkv_proj.quant_method, SparseBitmaskMethod)
    _assert_same_greedy(sparse_llm, dense_llm, 1e-4)
    # the decode steps took the one-call C loop, whose plan holds LIN_SPARSE projections
    assert model.model.native_decoder.abi.LIN_SPARSE in _plan_kinds(model)


def test_int8_two_four_decodes_through_the_int8_kernel(pruned_24):
    sparse_llm = _llm(pruned_24, quantization="int8")
    dense_llm = _llm(pruned_24, quantization="int8", sparsity="none")
    model = sparse_llm.engine.executor.worker.model
    layer = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer.quant_method, SparseInt8Method)
    assert layer.sparse_weight.layout == "2of4"  # the 2:4 kernel
    assert layer.quant_method.row_kernel(layer, 1).spec[1] == "LIN_SPARSE_Q8"
    assert model.lm_head.quant_method.name == "int8"
    assert dense_llm.engine.executor.worker.model.model.layers[0].mlp.gate_up_proj \
        .quant_method.name == "int8"
    # int8 weights either way; the 2:4 kernel of AVX-512 builds rounds activations to int16
    _assert_same_greedy(sparse_llm, dense_llm, 2e-3)
    assert model.model.native_decoder.abi.LIN_SPARSE_Q8 in _plan_kinds(model)
    # prefill-sized inputs go through the int8 weight the method keeps
    x = torch.randn(20, layer.in_features)
    torch.testing.assert_close(layer.quant_method.apply(layer, x),
                               layer.quant_method.dense.apply(layer, x))


def test_modes(tiny_llama, pruned):
    dense_model = _llm(tiny_llama, sparsity="bitmask").engine.executor.worker.model
    # nothing qualifies in a dense checkpoint, even when asked (too few zeros)
    assert not any(isinstance(m.quant_method, SparseBitmaskMethod)
                   for m in dense_model.modules() if hasattr(m, "quant_method"))
    with pytest.raises(ValueError, match="sparsity"):
        install_sparse(dense_model, "sometimes", True)
    with pytest.raises(ValueError, match="sparsity"):
        _llm(pruned, sparsity="sometimes")
    # auto serves 2:4 checkpoints sparse only where the kernel expands 32 bf16 columns at a time
    # (the 8-column one was measured slower than dense there); bitmask forces it
    wide = sparse.bf16_columns_per_expand() >= 32
    for mode, served in (("auto", wide), ("bitmask", True)):
        model = _llm(pruned, sparsity="none").engine.executor.worker.model
        assert (install_sparse(model, mode, True, structure="2:4") > 0) == served


def test_int8_modes(pruned, pruned_24):
    # int8 under auto: 2:4 everywhere; unstructured only where the VBMI kernel runs (the avx2
    # build's any-mask int8 kernel was measured no faster than dense int8); bitmask forces it
    wide = sparse.int8_columns_per_step() >= 64
    for path, structure, auto_served in ((pruned_24, "2:4", True),
                                         (pruned, "unstructured", wide)):
        for mode, served in (("auto", auto_served), ("bitmask", True)):
            model = _llm(path, quantization="int8", sparsity="none").engine.executor.worker.model
            assert (install_sparse(model, mode, True, structure=structure) > 0) == served
            assert isinstance(model.model.layers[0].mlp.down_proj.quant_method,
                              SparseInt8Method) == served


@pytest.mark.parametrize("int8", [False, True])
def test_rows_past_the_kernel_limit_keep_their_bits_when_row_invariant(int8):
    # a speculative verification of more rows than the kernel takes (K = 8: 9 rows) must give
    # each row the bits plain decoding gives it alone, so it stays on the sparse kernel
    from turbollm.layers.prefill_gemm import row_invariant
    from turbollm.quantization.int8 import Int8LinearMethod
    layer = _sparse_layer(128, 48, zeros=0.5)
    method = SparseBitmaskMethod
    if int8:
        Int8LinearMethod.create_weights(layer, 0)
        method = SparseInt8Method
    method.create_weights(layer)
    x = torch.randn(20, 128)
    with row_invariant():
        for rows in (9, 20):
            alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
            assert torch.equal(layer(x[:rows]), alone)
    # outside row-invariant steps, 20 rows are a prefill-sized input: the dense weight serves
    dense = layer.quant_method.dense.apply(layer, x)
    assert torch.equal(layer(x), dense)


def test_method_matches_dense_on_random_sparse_weights():
    layer = _sparse_layer(64, 40, zeros=0.6)
    w = layer.weight.detach().clone()
    SparseBitmaskMethod.create_weights(layer)
    for rows in (1, 3, 8, 20):  # the kernel up to its row limit, the dense weight past it
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=1e-5)
