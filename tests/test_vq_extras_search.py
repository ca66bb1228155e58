"""VectorQuantize's search extras: the k-nearest search (kernels/nearest_code.py), topk,
codebook_transform_fn (per-token codebooks) and the directional reparameterization (DiVeQ).

References are independent: fp64 brute force over every (row, code) pair, the DiVeQ formula
written out in fp64, and the peer (vector-quantize-pytorch 1.32) for shapes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vq_layers.kernels.nearest_code as nc
from dtype_matrix import Parts, dtype_matrix, run_cell
from vq_layers import VectorQuantize
from vq_layers.codebook_losses import orthogonal_loss
from vq_layers.directional_reparam import directional_reparam
from vq_layers.kernels.nearest_code import (
    nearest_code,
    nearest_codes,
    nearest_codes_per_token,
)

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


@pytest.mark.parametrize("tile", [3, 4, None])  # ties across code tiles, split by tiles, within one tile
def test_nearest_codes_ties_go_to_the_lowest_index(tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(nc, "TILE_ELEMENTS", tile)
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    codebook = torch.cat([base, base, base])  # code i, i + 3, i + 6 identical
    x = torch.tensor([[0.1, 0.0], [0.9, 0.1]])
    indices, _ = nearest_codes(x, codebook, "l2", 5)
    assert indices.tolist() == [[0, 3, 6, 1, 4], [1, 4, 7, 0, 3]]
    same = torch.zeros(7, 2)  # every code ties
    assert nearest_codes(x, same, "l2", 4)[0].tolist() == [[0, 1, 2, 3]] * 2
    per_token = codebook.expand(2, -1, -1)
    assert nearest_codes_per_token(x, per_token, "l2", 5)[0].tolist() == [[0, 3, 6, 1, 4], [1, 4, 7, 0, 3]]


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


# --------------------------------------------------------------------------------------------
# VectorQuantize(topk=...)


def ema_state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["tokens", "image", "channel_first", "one", "masked"])
def test_topk_matches_the_peer(train, layout):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kw = {"image": dict(accept_image_fmap=True), "channel_first": dict(channel_last=False)}.get(layout, {})
    ours = VectorQuantize(dim=6, codebook_size=12, **kw).train(train)
    peer = vqp.VectorQuantize(dim=6, codebook_size=12, **kw).train(train)
    peer.load_state_dict(ours.state_dict(), strict=False)
    x = {"image": randn(2, 6, 3, 4), "channel_first": randn(2, 6, 5), "one": randn(3, 6)}.get(layout, randn(2, 5, 6))
    fw = dict(topk=3)
    if layout == "masked":
        fw["mask"] = torch.tensor([[True] * 5, [True, True, False, False, False]])
    a, b = ours(x, **fw), peer(x, **fw)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert torch.equal(a[1], b[1].long())
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_topk_equals_fp64_brute_force(train):
    torch.manual_seed(0)  # the codebook's init: the near-tie check below holds for this draw
    layer = VectorQuantize(dim=4, codebook_size=20, commitment_weight=0.5).train(train)
    x = randn(3, 7, 4, seed=11)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 4:] = False
    out, indices, loss = layer(x, topk=4, mask=mask)
    codebook = layer.codebook.detach()
    ref, _, gap = brute_topk64(x.reshape(1, 21, 4), codebook[None], 4)
    ref = ref.reshape(3, 7, 4).masked_fill(~mask[..., None], -1)
    assert (gap > 1e-5).all() and torch.equal(indices, ref)
    codes = codebook.to(F64)[indices.clamp(min=0)]
    assert torch.equal(out, torch.where(mask[..., None, None], codebook[indices.clamp(min=0)], 0.0))
    expected = 0.5 * (codes - x.to(F64)[:, :, None]).square().mean(-1) * mask[..., None]
    torch.testing.assert_close(loss.to(F64), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("train", [True, False])
def test_topk_1_equals_the_plain_forward(train):
    layer = VectorQuantize(dim=5, codebook_size=9, codebook_dim=3, commitment_weight=0.7).train(train)
    x, mask = randn(2, 6, 5, seed=12), torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    state = ema_state(layer)
    k1 = layer(x, mask=mask, topk=1)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items()), "topk updated the codebook"
    plain = layer(x, mask=mask)  # searches the same codebook, then updates it
    assert torch.equal(k1[0][:, :, 0], plain[0]) and torch.equal(k1[1][..., 0], plain[1])
    if train:  # the plain loss is the masked mean of the per-token ones
        torch.testing.assert_close(k1[2].sum() / mask.sum(), plain[2], rtol=1e-6, atol=1e-7)


def test_topk_routes_each_codes_gradient_to_its_input():
    """Straight-through per k: d sum(w * out) / dx = sum_k w_k (commitment off)."""
    layer = VectorQuantize(dim=3, codebook_size=8, rotation_trick=False, commitment_weight=0.0).train()
    x = randn(2, 4, 3, seed=13).requires_grad_()
    out, _, _ = layer(x, topk=3)
    w = randn(*out.shape, seed=14)
    (out * w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(2))


def test_topk_errors():
    layer = VectorQuantize(dim=4, codebook_size=8)
    x = randn(2, 3, 4)
    for bad in (0, -1, True, 1.5, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="topk: expected"):
            layer(x, topk=bad)
    np = pytest.importorskip("numpy")
    plain = layer(x, topk=3)[1]
    for integral in (torch.tensor(3), np.int64(3)):  # integral values, as the peer's int(topk)
        assert torch.equal(layer(x, topk=integral)[1], plain)
    with pytest.raises(ValueError, match="heads=1"):
        VectorQuantize(dim=4, codebook_size=8, heads=2, codebook_dim=2)(x, topk=2)
    with pytest.raises(ValueError, match="topk, indices"):
        layer(x, topk=2, indices=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="commitment_use_cross_entropy_loss"):
        VectorQuantize(dim=4, codebook_size=8, commitment_use_cross_entropy_loss=True).train()(x, topk=2)
    assert layer(x, topk=50)[1].shape == (2, 3, 8)  # clamped to the codebook size, as the peer


def topk_unpack(result):
    out, indices, loss = result
    return Parts(out, indices=[indices], losses=[loss])


CONFIGS = {
    "topk": (dict(dim=6, codebook_size=10), dict(topk=3)),
    "diveq_topk": (dict(dim=6, codebook_size=10, codebook_dim=4, directional_reparam=True,
                        threshold_ema_dead_code=1), dict(topk=2)),
    "transform": (dict(dim=6, codebook_size=10, learnable_codebook=True, ema_update=False),
                  dict(codebook_transform_fn="shift")),
}


@pytest.mark.parametrize("cell", dtype_matrix())
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dtype_matrix(name, cell):
    kwargs, fw = CONFIGS[name]

    def forward(layer, x):
        extra = dict(fw)
        if "codebook_transform_fn" in extra:  # a per-token shift of the codebook
            shift = x.detach().float().unsqueeze(-2) * 0.1  # (b, n, 1, d)
            extra["codebook_transform_fn"] = lambda cb: cb[:, None, None] + shift
        return layer(x, **extra)

    res = run_cell(cell, lambda: VectorQuantize(**kwargs), lambda dt: randn(2, 5, 6, seed=15).to(dt), forward=forward,
                   unpack=topk_unpack if "topk" in fw else lambda r: Parts(r[0], indices=[r[1]], losses=[r[2]]))
    if "topk" in fw:  # the indices are the fp32 search's (the cell's input, rounded to its dtype)
        layer = res.layer
        if not layer.has_projections:
            x = res.x.detach().float().reshape(1, -1, 6)
            ref, _, gap = brute_topk64(x, layer.codebook.detach().float()[None], fw["topk"])
            clear = (gap > 1e-5).reshape(2, 5)
            assert torch.equal(res.parts.indices[0][clear], ref.reshape(2, 5, -1)[clear])


# --------------------------------------------------------------------------------------------
# codebook_transform_fn: per-token codebooks


def test_codebook_transform_fn_search_and_gradient_equal_fp64():
    """Indices = fp64 brute force over each token's codebook; the commitment loss's gradient
    reaches the transform's parameters (a learnable codebook, as ResidualVQ's implicit one)."""
    layer = VectorQuantize(dim=3, codebook_size=7, learnable_codebook=True, ema_update=False,
                           rotation_trick=False).train()
    x = randn(2, 5, 3, seed=16)
    shift = randn(2, 5, 1, 3, seed=17)
    scale = torch.tensor(1.5, requires_grad=True)
    out, indices, loss = layer(x, codebook_transform_fn=lambda cb: cb[:, None, None] * scale + shift)
    codebook = layer.codebook.detach()
    per_token = codebook.to(F64)[None, None] * 1.5 + shift.to(F64)  # (b, n, c, d)
    ref, _, gap = brute_topk64(x.reshape(1, 10, 3), per_token.reshape(1, 10, 7, 3).float(), 1)
    assert (gap > 1e-5).all() and torch.equal(indices, ref.reshape(2, 5))
    chosen = per_token.gather(2, indices[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    torch.testing.assert_close(out.to(F64), chosen, rtol=1e-6, atol=1e-6)
    loss.backward()
    s = torch.tensor(1.5, dtype=F64, requires_grad=True)
    picked = codebook.to(F64)[indices] * s + shift[:, :, 0].to(F64)
    ((picked - x.to(F64)).square().mean()).backward()
    torch.testing.assert_close(scale.grad.to(F64), s.grad, rtol=1e-5, atol=1e-6)


def test_codebook_transform_fn_topk_and_mask():
    layer = VectorQuantize(dim=3, codebook_size=6).eval()
    x, shift = randn(2, 4, 3, seed=18), randn(1, 2, 4, 6, 3, seed=19)
    mask = torch.tensor([[True] * 4, [True, False, False, True]])
    out, indices, loss = layer(x, topk=3, mask=mask, codebook_transform_fn=lambda cb: cb[:, None, None] + shift)
    per_token = (layer.codebook[None, None] + shift[0]).reshape(1, 8, 6, 3)
    ref, _, _ = brute_topk64(x.reshape(1, 8, 3), per_token, 3)
    assert torch.equal(indices, ref.reshape(2, 4, 3).masked_fill(~mask[..., None], -1))
    assert (out[~mask] == 0).all() and (loss[~mask] == 0).all()


def test_codebook_transform_fn_errors():
    layer = VectorQuantize(dim=3, codebook_size=6)
    x = randn(2, 4, 3)
    with pytest.raises(ValueError, match="codebook_transform_fn: expected it to return per-token codebooks"):
        layer(x, codebook_transform_fn=lambda cb: cb)
    with pytest.raises(TypeError, match="codebook_transform_fn: expected a callable"):
        layer(x, codebook_transform_fn=3)
    with pytest.raises(ValueError, match="codebook_transform_fn: not supported with heads=2"):
        VectorQuantize(dim=4, codebook_size=6, heads=2, codebook_dim=2)(randn(2, 4, 4),
                                                                        codebook_transform_fn=lambda c: c)
    with pytest.raises(ValueError, match="codebook_diversity_loss_weight=0.5"):
        VectorQuantize(dim=3, codebook_size=6, codebook_diversity_loss_weight=0.5)(x, codebook_transform_fn=lambda c: c)


# --------------------------------------------------------------------------------------------
# directional reparameterization (DiVeQ)


def test_directional_reparam_formula_fp64():
    """Value x + v ||q - x|| with v = normalize(q - x + sqrt(var) noise); gradients by the formula."""
    x, q, noise = randn(6, 4, seed=20).to(F64), randn(6, 4, seed=21).to(F64), randn(6, 4, seed=22).to(F64)
    x.requires_grad_(), q.requires_grad_()
    out = directional_reparam(x, q, 0.01, noise)
    e = (q - x).detach()
    v = e + 0.1 * noise
    v = v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, x.detach() + v * e.norm(dim=-1, keepdim=True))
    g = randn(6, 4, seed=23).to(F64)
    out.backward(g)
    unit_e = e / e.norm(dim=-1, keepdim=True)
    vg = (v * g).sum(-1, keepdim=True)
    torch.testing.assert_close(x.grad, g - unit_e * vg)
    torch.testing.assert_close(q.grad, unit_e * vg)


def test_directional_reparam_layer_value_and_gradients():
    """The layer's output is the code up to the direction noise; the gradients to the input and
    the codebook follow the formula, with v read off the output itself (fp64)."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=16, directional_reparam=True, threshold_ema_dead_code=1e-9).train()
    assert layer.learnable_codebook and not layer.ema_update and not layer.rotation_trick
    x = randn(3, 5, 4, seed=24).requires_grad_()
    codebook = layer.codebook.detach().clone()
    out, indices, loss = layer(x)
    assert loss.item() == 0.0  # no commitment loss with DiVeQ (as the peer)
    q = codebook.to(F64)[indices]
    err = q - x.detach().to(F64)
    length = err.norm(dim=-1, keepdim=True)
    assert ((out.detach().to(F64) - q).norm(dim=-1) < 0.3 * length[..., 0]).all()  # the code, up to noise
    assert not torch.equal(out.detach(), codebook[indices])  # ... and the noise is there
    v = (out.detach().to(F64) - x.detach().to(F64)) / length
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 5, dtype=F64))
    g = randn(3, 5, 4, seed=25)
    out.backward(g)
    unit_e, vg = err / length, (v * g.to(F64)).sum(-1, keepdim=True)
    torch.testing.assert_close(x.grad.to(F64), g.to(F64) - unit_e * vg, rtol=1e-5, atol=1e-6)
    expected = torch.zeros(16, 4, dtype=F64).index_add_(0, indices.flatten(), (unit_e * vg).reshape(-1, 4))
    torch.testing.assert_close(layer._codebook.embed.grad[0].to(F64), expected, rtol=1e-5, atol=1e-6)


def test_directional_reparam_zero_variance_is_the_code_and_eval_is_exact():
    layer = VectorQuantize(dim=4, codebook_size=8, directional_reparam=True, directional_reparam_variance=0.0,
                           threshold_ema_dead_code=1).train()
    x = randn(2, 6, 4, seed=26)
    out, indices, _ = layer(x)
    torch.testing.assert_close(out, layer.codebook.detach()[indices], rtol=1e-5, atol=1e-6)
    layer.eval()
    out, indices, _ = layer(x)
    assert torch.equal(out, layer.codebook.detach()[indices])


def test_directional_reparam_errors_and_state_dict():
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        VectorQuantize(dim=4, codebook_size=8, directional_reparam=True)
    diveq = dict(dim=4, codebook_size=8, directional_reparam=True, threshold_ema_dead_code=1)
    with pytest.raises(ValueError, match="choose one gradient estimator"):
        VectorQuantize(**diveq, rotation_trick=True)
    with pytest.raises(ValueError, match="choose one gradient estimator"):
        VectorQuantize(**diveq, straight_through=True)
    with pytest.raises(ValueError, match="directional_reparam_variance"):
        VectorQuantize(dim=4, codebook_size=8, directional_reparam=True, threshold_ema_dead_code=1,
                       directional_reparam_variance=-1.0)
    a = VectorQuantize(dim=4, codebook_size=8, directional_reparam=True, threshold_ema_dead_code=1)
    b = VectorQuantize(dim=4, codebook_size=8, directional_reparam=True, threshold_ema_dead_code=1)
    b.load_state_dict(a.state_dict())
    x = randn(2, 3, 4, seed=27)
    assert torch.equal(a.eval()(x)[0], b.eval()(x)[0])


@pytest.mark.parametrize("train", [True, False])
def test_empty_and_all_masked_batches(train):
    layer = VectorQuantize(dim=4, codebook_size=8).train(train)
    out, indices, loss = layer(randn(0, 5, 4), topk=2)
    assert out.shape == (0, 5, 2, 4) and indices.shape == loss.shape == (0, 5, 2)
    out, indices, _ = layer(randn(0, 5, 4), codebook_transform_fn=lambda cb: cb[:, None, None].expand(-1, 0, 5, -1, -1))
    assert out.shape == (0, 5, 4) and indices.shape == (0, 5)
    state = ema_state(layer)
    out, indices, loss = layer(randn(2, 5, 4), mask=torch.zeros(2, 5, dtype=torch.bool), topk=3)
    assert (out == 0).all() and (indices == -1).all() and (loss == 0).all()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


def test_route_gradients_to_input_false():
    """The output's gradient reaches the (learnable) codebook, not the input."""
    layer = VectorQuantize(dim=3, codebook_size=6, learnable_codebook=True, ema_update=False,
                           route_gradients_to_input=False, commitment_weight=0.0).train()
    x = randn(2, 4, 3, seed=30).requires_grad_()
    out, indices, _ = layer(x)
    g = randn(2, 4, 3, seed=31)
    out.backward(g)
    assert x.grad is None or (x.grad == 0).all()
    expected = torch.zeros(6, 3).index_add_(0, indices.flatten(), g.reshape(-1, 3))
    torch.testing.assert_close(layer._codebook.embed.grad[0], expected)


def test_topk_nan_in_training_raises_before_any_buffer_changes_and_loss_breakdown():
    layer = VectorQuantize(dim=3, codebook_size=6, kmeans_init=True).train()
    state = ema_state(layer)
    x = randn(2, 4, 3, seed=32)
    x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x, topk=2)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    _, indices, loss, breakdown = layer(randn(2, 4, 3, seed=33), topk=2, return_loss_breakdown=True)
    assert breakdown.commitment.shape == indices.shape == loss.shape == (2, 4, 2)
    torch.testing.assert_close(loss, breakdown.commitment)  # commitment_weight 1, no other loss


# --------------------------------------------------------------------------------------------
# the search extras combined with the statistics extras (affine_param, sync_update_v,
# in_place_codebook_optimizer, accum_ema_update, ema_update_weight) and straight_through


STATISTICS_EXTRAS = {
    "plain": dict(),
    "affine_param": dict(affine_param=True),
    "sync_update_v": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "in_place": dict(learnable_codebook=True, ema_update=False,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)),
    "accum_ema_update": dict(),  # forward keyword
    "ema_update_weight": dict(),  # forward keyword
    "straight_through": dict(straight_through=True, rotation_trick=False),  # Gumbel surrogate (temperature 1)
    "straight_through_learnable": dict(straight_through=True, rotation_trick=False, learnable_codebook=True,
                                       ema_update=False, sync_update_v=0.3),
}
FORWARD_KEYWORDS = {"accum_ema_update": dict(accum_ema_update=True),
                    "ema_update_weight": dict(ema_update_weight=torch.linspace(0.5, 1.0, 8))}


def run_with_gradients(layer, x, w, **kwargs):
    """forward + backward of sum(w * out) + mean(loss) (topk: per-token losses) -> (out, indices,
    input grad, codebook grad)."""
    x = x.clone().requires_grad_()
    out, indices, loss = layer(x, **kwargs)
    ((out * w).sum() + loss.mean()).backward()
    grad = layer._codebook.embed.grad
    return out.detach(), indices, x.grad, None if grad is None else grad.clone()


def assert_same_step(a, b):
    for name, u, v in zip(("output", "indices", "input grad", "codebook grad"), a, b):
        assert (u is None) == (v is None), name
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra", sorted(STATISTICS_EXTRAS))
@pytest.mark.parametrize("search", ["topk", "codebook_transform_fn"])
def test_search_extras_with_statistics_extras(search, extra):
    """Each combination raises a clear ValueError or is consistent: topk=1 leaves every buffer
    as it was and equals the plain forward on the codes it searched (values and gradients);
    an identity codebook_transform_fn equals the plain forward (values, gradients, the state after)."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=3, codebook_size=8, commitment_weight=0.3, **STATISTICS_EXTRAS[extra]).train()
    x, w = randn(2, 5, 3, seed=40), randn(2, 5, 3, seed=41)
    keywords = FORWARD_KEYWORDS.get(extra, {})
    plain = copy.deepcopy(layer)
    if search == "topk":
        if extra == "in_place":
            with pytest.raises(ValueError, match="topk, in_place_codebook_optimizer"):
                layer(x, topk=1)
            return
        state = ema_state(layer)
        searched = layer._codebook.codes()[0].detach().clone()
        out, indices, gx, gc = run_with_gradients(layer, x, w[:, :, None], topk=1, **keywords)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items()), "topk changed a buffer"
        ref, _, gap = brute_topk64(x.reshape(1, 10, 3), searched[None], 1)  # the codes actually searched
        assert (gap > 1e-5).all() and torch.equal(indices[..., 0], ref.reshape(2, 5))
        assert torch.equal(out[:, :, 0], searched[indices[..., 0]])
        if extra == "affine_param":  # the plain forward maps the codes onto this batch first: not comparable
            return
        reference = run_with_gradients(plain, x, w, **keywords)
        assert_same_step((out[:, :, 0], indices[..., 0], gx, gc), reference)
        return

    def per_token(cb):  # every token's codebook: the codebook
        return cb[:, None, None].expand(1, 2, 5, *cb.shape[1:])

    if extra == "in_place":
        with pytest.raises(ValueError, match="codebook_transform_fn: not supported with in_place_codebook_optimizer"):
            layer(x, codebook_transform_fn=per_token)
        return
    result = run_with_gradients(layer, x, w, codebook_transform_fn=per_token, **keywords)
    assert_same_step(result, run_with_gradients(plain, x, w, **keywords))
    for (name, u), v in zip(layer.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)


def test_codebook_transform_fn_gumbel_straight_through_surrogate_uses_the_per_token_codebooks():
    """straight_through with temperature t > 0: the input's gradient is that of
    softmax(-||x - c||/t) @ C over each token's own codebook C (fp64), not the base codebook's."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=8, straight_through=True, rotation_trick=False,
                           commitment_weight=0.0, sample_codebook_temp=0.7).train()
    codebook = layer.codebook.detach().clone()
    x = randn(1, 16, 4, seed=42).requires_grad_()
    shift = randn(1, 16, 8, 4, seed=43)
    out, _, _ = layer(x, codebook_transform_fn=lambda c: (c * 3 + 1)[:, None] + shift)
    w = randn(*out.shape, seed=44)
    (out * w).sum().backward()
    x64 = x.detach().to(F64).requires_grad_()
    per_token = (codebook.to(F64) * 3 + 1)[None, None] + shift.to(F64)  # (1, 16, 8, 4)
    probs = (-(x64[:, :, None] - per_token).square().sum(-1).sqrt() / 0.7).softmax(-1)
    ((probs[..., None] * per_token).sum(-2) * w.to(F64)).sum().backward()
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=1e-4, atol=1e-6)


def test_frozen_codebook_gets_no_gradient_without_routing_to_the_input():
    """route_gradients_to_input=False with freeze_codebook: the output is the frozen codes."""
    layer = VectorQuantize(dim=3, codebook_size=6, learnable_codebook=True, ema_update=False,
                           route_gradients_to_input=False, commitment_weight=0.0).train()
    x = randn(2, 4, 3, seed=45).requires_grad_()
    for kwargs in (dict(freeze_codebook=True), dict(freeze_codebook=True, topk=2)):
        out, _, _ = layer(x, **kwargs)
        if out.requires_grad:
            assert torch.autograd.grad(out.sum(), layer._codebook.embed, allow_unused=True)[0] is None


def test_topk_computes_the_orthogonal_loss_once():
    """orthogonal_reg_active_codes_only: one loss over the k codes (one randperm draw with
    orthogonal_reg_max_codes: the same draw as a direct computation)."""
    layer = VectorQuantize(dim=3, codebook_size=12, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                           orthogonal_reg_max_codes=4, commitment_weight=0.0).train()
    x = randn(2, 5, 3, seed=46)
    torch.manual_seed(1)
    _, indices, _, breakdown = layer(x, topk=3, return_loss_breakdown=True)
    torch.manual_seed(1)
    expected = orthogonal_loss(layer._codebook.codes(), indices.reshape(1, -1), None, True, 4)
    torch.testing.assert_close(breakdown.orthogonal_reg, expected)
