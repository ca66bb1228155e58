"""VectorQuantize's search extras: the k-nearest search (kernels/nearest_code.py), topk,
codebook_transform_fn (per-token codebooks) and the directional reparameterization (DiVeQ).

References are independent: fp64 brute force over every (row, code) pair, the DiVeQ formula
written out in fp64, and the peer (vector-quantize-pytorch 1.32) for shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vq_layers.kernels.nearest_code as nc
from vq_layers.kernels.nearest_code import nearest_code, nearest_codes, nearest_codes_per_token

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def brute_topk64(x, codebook, k, metric="l2"):
    """fp64: every score, sorted best first, ties to the lowest index (stable sort).
    x (h, n, d); codebook (h, c, d) or per token (h, n, c, d) -> (indices, scores, gap), where
    gap is the smallest relative gap between consecutive ranks 1..k+1 of a row (near-ties)."""
    x64, c64 = x.to(F64), codebook.to(F64)
    if c64.ndim == 3:
        c64 = c64[:, None].expand(-1, x.shape[1], -1, -1)
    terms = (x64[:, :, None] - c64).square() if metric == "l2" else x64[:, :, None] * c64
    score = terms.sum(-1)  # (h, n, c)
    cost = score if metric == "l2" else -score
    order = cost.sort(dim=-1, stable=True).indices
    ranked = cost.gather(-1, order)[..., : k + 1]
    scale = ranked.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    gap = (ranked[..., 1:] - ranked[..., :-1]).abs().amin(-1) / scale[..., 0] if ranked.shape[-1] > 1 else None
    return order[..., :k], score.gather(-1, order[..., :k]), gap


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# --------------------------------------------------------------------------------------------
# the k-nearest search


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("h, n, c, d, k, tile", [(1, 37, 23, 5, 4, None), (3, 41, 19, 3, 7, 50), (2, 9, 6, 2, 6, 7)])
def test_nearest_codes_equal_fp64_topk(metric, h, n, c, d, k, tile, monkeypatch):
    if tile is not None:  # many code and row tiles: the running merge is exercised
        monkeypatch.setattr(nc, "TILE_ELEMENTS", tile)
    x, codebook = randn(h, n, d, seed=1), randn(h, c, d, seed=2)
    indices, scores = nearest_codes(x, codebook, metric, k)
    ref, ref_scores, gap = brute_topk64(x, codebook, k, metric)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == scores.shape == (h, n, k)
    clear = gap > 1e-5
    assert clear.float().mean() > 0.9, "mostly near-ties: a vacuous comparison"
    assert torch.equal(indices[clear], ref[clear])
    torch.testing.assert_close(scores.to(F64), ref_scores, rtol=1e-5, atol=1e-5)


def test_nearest_codes_ties_go_to_the_lowest_index(monkeypatch):
    monkeypatch.setattr(nc, "TILE_ELEMENTS", 3)  # ties across code tiles
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    codebook = torch.cat([base, base, base])  # code i, i + 3, i + 6 identical
    x = torch.tensor([[0.1, 0.0], [0.9, 0.1]])
    indices, _ = nearest_codes(x, codebook, "l2", 5)
    assert indices.tolist() == [[0, 3, 6, 1, 4], [1, 4, 7, 0, 3]]


def test_nearest_codes_k1_is_nearest_code():
    x, codebook = randn(2, 64, 4, seed=3), randn(2, 30, 4, seed=4)
    for metric in ("l2", "dot"):
        i1, s1 = nearest_codes(x, codebook, metric, 1)
        i0, s0 = nearest_code(x, codebook, metric)
        assert torch.equal(i1[..., 0], i0) and torch.equal(s1[..., 0], s0)


def test_nearest_codes_far_from_origin():
    """Data far from the origin (centred search): still the fp64 order."""
    x, codebook = randn(200, 3, seed=5) + 3e3, randn(40, 3, seed=6) + 3e3
    indices, _ = nearest_codes(x, codebook, "l2", 3)
    ref, _, gap = brute_topk64(x[None], codebook[None], 3)
    clear = gap[0] > 1e-6
    assert clear.float().mean() > 0.9 and torch.equal(indices[clear], ref[0][clear])


def test_nearest_codes_memory_bounded(monkeypatch):
    monkeypatch.setattr(nc, "TILE_ELEMENTS", 256)
    n, c, d, k = 300, 200, 4, 3
    x, codebook = randn(n, d, seed=7), randn(c, d, seed=8)
    with MaxNumel() as seen:
        nearest_codes(x, codebook, "l2", k)
    assert seen.largest < n * c / 10, f"a block of {seen.largest} elements for n x K = {n * c}"


def test_nearest_codes_gumbel_topk_is_sampling_without_replacement():
    """P(first = i, second = j) = p_i p_j / (1 - p_i) with p = softmax(-||x - c||^2 / t)."""
    codebook = torch.tensor([[0.0], [0.5], [1.0], [2.0]])
    rows = 20000
    x = torch.zeros(rows, 1)
    t = 0.5
    indices, _ = nearest_codes(x, codebook, "l2", 2, temperature=t, generator=torch.Generator().manual_seed(0))
    assert (indices[:, 0] != indices[:, 1]).all()
    p = torch.softmax(-codebook[:, 0].to(F64).square() / t, 0)
    for i in range(4):
        for j in range(4):
            if i != j:
                expected = (p[i] * p[j] / (1 - p[i])).item()
                seen = ((indices[:, 0] == i) & (indices[:, 1] == j)).double().mean().item()
                assert abs(seen - expected) < 4 * math.sqrt(expected * (1 - expected) / rows) + 1e-3, (i, j)


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_nearest_codes_per_token_equal_fp64(metric, monkeypatch):
    monkeypatch.setattr(nc, "TILE_ELEMENTS", 100)  # several row chunks
    h, n, c, d, k = 2, 25, 9, 3, 4
    x, codebooks = randn(h, n, d, seed=9), randn(h, n, c, d, seed=10)
    with MaxNumel() as seen:
        indices, scores = nearest_codes_per_token(x, codebooks, metric, k)
    assert seen.largest <= codebooks.numel()  # nothing beyond the inherent per-token codebooks
    ref, ref_scores, gap = brute_topk64(x, codebooks, k, metric)
    clear = gap > 1e-5
    assert clear.float().mean() > 0.9 and torch.equal(indices[clear], ref[clear])
    torch.testing.assert_close(scores.to(F64), ref_scores, rtol=1e-5, atol=1e-5)


def test_nearest_codes_errors():
    x, codebook = randn(5, 3), randn(4, 3)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k: expected an int in \\[1, 4\\]"):
            nearest_codes(x, codebook, "l2", bad)
    with pytest.raises(ValueError, match="metric"):
        nearest_codes(x, codebook, "cos", 2)
    with pytest.raises(ValueError, match="codebooks: expected"):
        nearest_codes_per_token(x, randn(4, 4, 3), "l2", 2)
    with pytest.raises(ValueError, match="k: expected"):
        nearest_codes_per_token(x, randn(5, 4, 3), "l2", 9)
