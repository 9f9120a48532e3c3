"""Masks of magnitude / Wanda pruning and the SparseGPT update, on random layers (no model)."""
from __future__ import annotations

import pytest
import torch

from turbollm.compress.prune_scores import mask_for, nm_mask, parse_pattern, unstructured_mask
from turbollm.compress.sparsegpt import layer_error, sparsegpt_prune


def _layer(out_f=48, in_f=64, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    # inputs whose channels differ in scale by ~100x and are correlated (a few directions
    # carry most of the signal), as LLM activations are
    x = torch.randn(rows, 8, generator=g) @ torch.randn(8, in_f, generator=g)
    x = x + 0.3 * torch.randn(rows, in_f, generator=g)
    x = x * torch.logspace(-1, 1, in_f)[torch.randperm(in_f, generator=g)]
    return w, x


def test_unstructured_per_row_removes_the_fraction_from_every_row():
    s = torch.rand(10, 40)
    m = unstructured_mask(s, 0.5, per_row=True)
    assert (m.sum(1) == 20).all()
    # the kept ones are each row's largest
    assert (s[m].reshape(10, 20).min(1).values >= s[~m].reshape(10, 20).max(1).values).all()


def test_unstructured_matrix_wide_can_differ_per_row():
    s = torch.rand(10, 40)
    s[0] += 10  # row 0 holds the largest scores
    m = unstructured_mask(s, 0.5, per_row=False)
    assert int(m.sum()) == 200 and bool(m[0].all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    mask = nm_mask(torch.rand(12, 64), n, m)
    assert (mask.reshape(12, -1, m).sum(-1) == n).all()


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_wanda_keeps_small_weights_on_loud_channels():
    w = torch.ones(4, 8)
    w[:, 0] = 0.1  # small weights...
    norms = torch.ones(8)
    norms[0] = 100.0  # ...on a channel with large activations
    mag = mask_for("magnitude", w, None, 0.25, None)
    wanda = mask_for("wanda", w, norms, 0.25, None)
    assert not mag[:, 0].any() and wanda[:, 0].all()


def test_wanda_beats_magnitude_on_layer_output_error():
    w, x = _layer()
    h = x.T @ x
    norms = x.square().sum(0).sqrt()
    err = {m: layer_error(w, w * mask_for(m, w, norms, 0.5, None), h)
           for m in ("magnitude", "wanda")}
    assert err["wanda"] < 0.8 * err["magnitude"]


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_sparsegpt_sparsity_and_error_below_wanda(pattern):
    w, x = _layer()
    h = x.T @ x
    sparsity = None if pattern else 0.5
    p = sparsegpt_prune(w, h, sparsity, pattern, block=32)
    if pattern is None:
        assert int((p == 0).sum()) >= w.numel() // 2
        assert int((p == 0).sum()) <= w.numel() // 2 + 4  # per-block rounding only
    else:
        n, m = pattern
        assert ((p != 0).reshape(48, -1, m).sum(-1) <= n).all()
    wanda = w * mask_for("wanda", w, x.square().sum(0).sqrt(), sparsity, pattern)
    # the OBS update makes the kept weights absorb the loss: clearly below Wanda's error
    assert layer_error(w, p, h) < 0.7 * layer_error(w, wanda, h)


def test_sparsegpt_with_an_identity_hessian_is_magnitude_per_block():
    w, _ = _layer(8, 16)
    p = sparsegpt_prune(w, torch.eye(16), 0.5, block=16)
    # no correlations: no compensation, the smallest half of |w| goes
    assert torch.equal(p, w * unstructured_mask(w.abs(), 0.5, per_row=False))
