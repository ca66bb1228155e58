"""Tests of HierarchicalVQ against an fp64 re-implementation of VAR's multi-scale residual
quantization (arXiv 2404.02905, Algorithm 1), written from the description:

- residual_0 = x (channel-first, fp64); level k takes the mean of the residual over each
  adaptive-pooling window (window i of an axis of size L pooled to S: [floor(iL/S), ceil((i+1)L/S)));
  with a mask, the mean over the window's kept positions, a cell with none kept is masked;
- picks the brute-force nearest code of each pooled vector (fp64);
- interpolates the codes linearly per axis back to full size (align_corners=False: source
  position (i + 0.5) * in / out - 0.5, clamped at 0), refines them with
  phi(u) = u + r * (conv(u) - u) (the layer's conv weights in fp64), r = |quant_resi|;
- residual_{k+1} = residual_k - phi(u_k); the reconstruction is the sum of the phi(u_k) (the
  first cutoff + 1 of them under nested dropout), zero at masked positions.

To keep one genuine near-tie (two best squared distances within 1e-5 of the distance scale)
from changing every later level, the reference continues each level from the layer's own
choice; near-ties are left out of the index checks.
"""

from __future__ import annotations

import copy
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from dist_utils import run_in_processes
from dtype_matrix import DTYPES, dtype_matrix, run_cell
from reference import assert_buffers_equal, buffer_state, call_structure, close, randn
from vq_layers import HierarchicalVQ, VectorQuantize

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# no k-means, no dead codes: the codebooks are the ones a test sets
PLAIN = dict(kmeans_init=False, threshold_ema_dead_code=0, decay=0.8)


# ------------------------------------------------------------------------------------------
# fp64 reference


def nearest64(r, codebook):
    """r (..., d), codebook (K, d) fp64 -> brute-force argmin (...), near-tie flag (...)."""
    d2 = (r.unsqueeze(-2) - codebook).square().sum(-1)
    two = d2.topk(2, dim=-1, largest=False).values if codebook.shape[0] > 1 else d2.repeat_interleave(2, -1) + 1
    scale = r.square().sum(-1) + codebook.square().sum(-1).max()
    return d2.argmin(-1), (two[..., 1] - two[..., 0]) <= 1e-5 * scale


def window_sums(t, axis, size):
    """Sums of t over the adaptive-pooling windows of `axis`, pooled to `size` windows."""
    length = t.shape[axis]
    sums = [t.narrow(axis, math.floor(i * length / size), math.ceil((i + 1) * length / size)
                     - math.floor(i * length / size)).sum(axis) for i in range(size)]
    return torch.stack(sums, dim=axis)


def pool64(t, shape, keep):
    """t (b, d, ...) fp64 -> masked window means (b, d, *shape), kept cells (b, *shape)."""
    weight = torch.ones(t.shape[0], 1, *t.shape[2:], dtype=F64) if keep is None else keep.unsqueeze(1).to(F64)
    total = torch.where(weight > 0, t, 0.0)
    for axis, size in enumerate(shape, start=2):
        total, weight = window_sums(total, axis, size), window_sums(weight, axis, size)
    cells = weight > 0
    return total / torch.where(cells, weight, 1.0), cells[:, 0]


def interp64(t, shape):
    """Separable linear interpolation of t (b, d, ...) to (b, d, *shape), align_corners=False."""
    for axis, out in enumerate(shape, start=2):
        size = t.shape[axis]
        rows = []
        for i in range(out):
            src = max((i + 0.5) * size / out - 0.5, 0.0)
            i0 = min(math.floor(src), size - 1)
            i1, w = min(i0 + 1, size - 1), src - i0
            rows.append((1 - w) * t.select(axis, i0) + w * t.select(axis, i1))
        t = torch.stack(rows, dim=axis)
    return t


def phi64(phi, u):
    ratio = abs(phi.resi_ratio)
    if ratio <= 1e-8:
        return u
    conv = (F.conv1d, F.conv2d, F.conv3d)[u.ndim - 3]
    out = conv(u, phi.conv.weight.detach().to(F64), phi.conv.bias.detach().to(F64), padding=1)
    return u + ratio * (out - u)


def reference(layer, x, keep=None, picked=None, phis=None):
    """fp64 pipeline of `layer` (its codebooks and phi weights) on channel-first x. `picked`:
    the layer's indices, to continue each level from (see the module docstring). `phis`: phi
    index per level (the layer's choice otherwise)."""
    residual = x.detach().to(F64)
    full = tuple(x.shape[2:])
    recon = torch.zeros_like(residual)
    levels = []
    for k, shape in enumerate(layer.level_shapes):
        pooled, cells = pool64(residual, shape, keep)
        codebook = layer.get_vq(k).codebook.detach().to(F64)
        tokens = rearrange(pooled, "b d ... -> b ... d")
        idx, tie = nearest64(tokens, codebook)
        use = idx if picked is None else picked[k].clamp(min=0)
        code = torch.where(cells.unsqueeze(-1), codebook[use], 0.0)
        phi = layer.choose_phi(k) if phis is None else (layer.phi_levels or [layer.phi_shared])[phis[k]]
        contribution = phi64(phi, interp64(rearrange(code, "b ... d -> b d ..."), full))
        recon, residual = recon + contribution, residual - contribution
        mse = (tokens - codebook[use]).square()[cells].mean() if cells.any() else torch.zeros((), dtype=F64)
        levels.append(SimpleNamespace(indices=idx.masked_fill(~cells, -1), tie=tie & cells, cells=cells,
                                      pooled=tokens, mse=mse, recon=recon))
    out = recon if keep is None else torch.where(keep.unsqueeze(1), recon, 0.0)
    return SimpleNamespace(levels=levels, out=out)


def assert_levels_match(indices, ref, min_fraction=0.5):
    """Each level's indices equal the reference's, near-ties excepted."""
    for k, (idx, level) in enumerate(zip(indices, ref.levels)):
        assert idx.dtype == torch.long and idx.shape == level.indices.shape
        ok = ~level.tie
        assert ok.float().mean() >= min_fraction, "too many near-ties for a meaningful check"
        assert torch.equal(idx[ok], level.indices[ok]), f"level {k}: not the fp64 nearest code"


def set_codebooks(layer, seed, scale=1.0):
    vqs = [layer.vq] if layer.shared_codebook else list(layer.vqs)
    for k, vq in enumerate(vqs):
        vq.codebook = randn(*vq.codebook.shape, seed=seed + k, scale=scale * 0.6**k)
    return layer




# ------------------------------------------------------------------------------------------
# against the references


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_one_full_resolution_level_equals_vector_quantize(masked):
    """One level at the input's size, phi off: the layer is a VectorQuantize on the tokens, in
    training (k-means init, EMA step, dead codes, loss) and in eval."""
    kwargs = dict(decay=0.8, kmeans_iters=3, threshold_ema_dead_code=1.0, commitment_weight=0.7)
    torch.manual_seed(0)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=[10], quant_resi=0.0, **kwargs).train()
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, channel_last=False, rotation_trick=False,
                        **kwargs).train()
    vq.load_state_dict({k.removeprefix("vq."): v for k, v in hvq.state_dict().items() if k.startswith("vq.")})
    vq._codebook.sample_draws.seed.copy_(hvq.vq._codebook.sample_draws.seed)  # the same row draws (not state)
    mask = randn(3, 10, seed=2) > -0.6 if masked else None
    for step in range(3):
        x = randn(3, 4, 10, seed=step)
        torch.manual_seed(step)
        out, (indices,), loss = hvq(x.clone().requires_grad_(True), mask=mask)
        torch.manual_seed(step)
        vq_out, vq_indices, vq_loss = vq(x.clone().requires_grad_(True), mask=mask)
        assert torch.equal(indices, vq_indices) and torch.equal(out, vq_out)
        close(loss, vq_loss, rtol=1e-6, atol=1e-7)
        vq_state = vq.state_dict()
        for name, buf in hvq.vq.state_dict().items():
            assert torch.equal(buf, vq_state[name]), f"{name} differs after step {step}"
    assert bool(hvq.vq._codebook.initted)
    hvq.eval(), vq.eval()
    x = randn(3, 4, 10, seed=9)
    (out, (indices,), loss), (vq_out, vq_indices, vq_loss) = hvq(x, mask=mask), vq(x, mask=mask)
    assert torch.equal(out, vq_out) and torch.equal(indices, vq_indices) and torch.equal(loss, vq_loss)


LAYOUTS = {
    "1d": dict(kwargs=dict(scales=[1, 2, 3, 7]), shape=(3, 4, 7)),
    "2d": dict(kwargs=dict(scales=[1, (2, 3), (3, 3), (4, 5)], accept_image_fmap=True), shape=(2, 4, 4, 5)),
    "3d": dict(kwargs=dict(scales=[1, (1, 2, 2), (2, 3, 3)], accept_3d_fmap=True), shape=(2, 4, 2, 3, 3)),
    "2d_coarse": dict(kwargs=dict(scales=[1, 2, 3], accept_image_fmap=True), shape=(2, 4, 5, 6)),
}


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("shared,share_quant_resi", [(True, 1), (False, 0), (False, 2)],
                         ids=["shared", "per_level", "two_phis"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_level_is_the_fp64_nearest_code_of_its_pooled_residual(layout, shared, share_quant_resi, masked):
    spec = LAYOUTS[layout]
    torch.manual_seed(0)
    layer = HierarchicalVQ(dim=4, codebook_size=12, shared_codebook=shared, share_quant_resi=share_quant_resi,
                           quant_resi=-0.5, **spec["kwargs"], **PLAIN)
    set_codebooks(layer, seed=10).eval()
    x = randn(*spec["shape"], seed=11)
    keep = randn(spec["shape"][0], *spec["shape"][2:], seed=12) > -0.8 if masked else None
    out, indices, loss = layer(x, mask=keep)
    ref = reference(layer, x, keep, picked=indices)
    assert_levels_match(indices, ref)
    close(out, ref.out, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32 and loss.ndim == 0
    if masked:
        assert (out.movedim(1, -1)[~keep] == 0).all()


@pytest.mark.parametrize("share_quant_resi,expected", [(1, [0, 0, 0, 0]), (0, [0, 1, 2, 3]), (2, [0, 0, 1, 1]),
                                                       (3, [0, 1, 1, 2]), (9, [0, 1, 2, 3])])
def test_phi_of_each_level(share_quant_resi, expected):
    """share_quant_resi=p > 1 spreads p phis over the levels by relative depth, rounded."""
    torch.manual_seed(0)
    layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 2, 3, 5], share_quant_resi=share_quant_resi, **PLAIN)
    set_codebooks(layer, seed=20).eval()
    assert len(layer.phi_levels or [layer.phi_shared]) == max(expected) + 1
    x = randn(2, 3, 5, seed=21)
    out, indices, _ = layer(x)
    ref = reference(layer, x, picked=indices, phis=expected)
    close(out, ref.out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("layout,channel_first", [("1d", True), ("2d", False), ("3d", True), ("2d_coarse", True)])
def test_decoding_the_indices_reproduces_the_eval_forward(layout, channel_first, masked):
    spec = LAYOUTS[layout]
    torch.manual_seed(0)
    layer = HierarchicalVQ(dim=4, codebook_size=12, channel_first=channel_first, shared_codebook=False,
                           share_quant_resi=0, **spec["kwargs"], **PLAIN)
    set_codebooks(layer, seed=30).eval()
    x = randn(*spec["shape"], seed=31)
    keep = randn(spec["shape"][0], *spec["shape"][2:], seed=32) > -0.5 if masked else None
    if not channel_first:
        x = x.movedim(1, -1)
    full = tuple(spec["shape"][2:])
    out, indices, _ = layer(x.bfloat16(), mask=keep)
    decoded = layer.get_output_from_indices(indices, full_shape=full)
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    as_bf16 = layer.get_output_from_indices(indices, full_shape=full, dtype=torch.bfloat16)
    if layout == "2d_coarse":  # no level at full size: the indices cannot tell the masked positions
        if keep is not None:
            dropped = ~keep.unsqueeze(1).expand_as(out)
            assert not (out[dropped] == as_bf16[dropped]).all()
        kept = torch.ones_like(out, dtype=torch.bool) if keep is None else keep.unsqueeze(1).expand_as(out)
        decoded, as_bf16, out = decoded[kept], as_bf16[kept], out[kept]
    else:  # the last level is full size: the default full shape, masked positions zero
        assert torch.equal(layer.get_output_from_indices(indices, dtype=torch.bfloat16), out)
    assert torch.equal(decoded.bfloat16(), out)
    assert torch.equal(as_bf16, out)


# ------------------------------------------------------------------------------------------
# nested dropout, masks, statistics


def _nested_layer(seed=0):
    torch.manual_seed(seed)  # (the layer's dropout draws are seeded from torch's generator)
    layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 2, 3, 6], nested_dropout=1.0,
                           nested_dropout_min_levels=2, commitment_weight=0.5, **PLAIN)
    return set_codebooks(layer, seed=40)


def test_nested_dropout_keeps_a_prefix_of_levels():
    x = randn(2, 3, 6, seed=41)
    seen = set()
    for seed in range(8):
        base = _nested_layer(seed).train()
        layer = copy.deepcopy(base)
        out, indices, loss, cutoff = layer(x.clone().requires_grad_(True), return_cutoff=True)
        again = copy.deepcopy(base)(x.clone().requires_grad_(True), return_cutoff=True)
        assert again[3] == cutoff and torch.equal(again[0], out)  # reproducible from torch's seed
        assert cutoff in (1, 2)  # levels 0..cutoff kept: at least min_levels, never all
        seen.add(cutoff)
        assert all((idx >= 0).all() for idx in indices)  # every level is still quantized
        ref = reference(base, x, picked=indices)  # the step searched base's codebooks
        assert_levels_match(indices, ref)
        close(out, ref.levels[cutoff].recon, rtol=1e-5, atol=1e-5)
        expected = 0.5 * torch.stack([level.mse for level in ref.levels[: cutoff + 1]]).mean()
        close(loss, expected, rtol=1e-5, atol=1e-7)
    assert seen == {1, 2}


def test_no_nested_dropout_in_eval_without_grad_or_when_off():
    layer = _nested_layer()
    x = randn(2, 3, 6, seed=42)
    ref = reference(layer, x)
    for mode in ("eval", "no_grad", "off"):
        probe = copy.deepcopy(layer).train(mode != "eval")
        if mode == "off":
            probe.nested_dropout = 0.0
        with torch.set_grad_enabled(mode != "no_grad"):
            out, _, _, cutoff = probe(x, return_cutoff=True)
        assert cutoff is None
        close(out, ref.out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_level"])
def test_masked_training_step_counts_only_the_kept_cells(shared):
    """One EMA step from the kept cells' masked means (one step for a shared codebook, from all
    levels), whatever the padding holds (NaN included)."""
    torch.manual_seed(0)
    layer = set_codebooks(HierarchicalVQ(dim=3, codebook_size=6, scales=[1, 2, 5], shared_codebook=shared,
                                         **PLAIN), seed=50).train()
    x = randn(3, 3, 5, seed=51)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    results = []
    for padding in (float("nan"), 1e4):
        probe = copy.deepcopy(layer)
        padded = torch.where(keep.unsqueeze(1), x, padding).requires_grad_(True)
        out, indices, _ = probe(padded, mask=keep)
        out.sum().backward()
        assert torch.isfinite(padded.grad).all() and (padded.grad.movedim(1, -1)[~keep] == 0).all()
        results.append((probe, out, indices))
    (probe, out, indices), (other, other_out, other_indices) = results
    assert torch.equal(out, other_out) and all(torch.equal(a, b) for a, b in zip(indices, other_indices))
    assert_buffers_equal(other, buffer_state(probe))
    ref = reference(layer, x, keep, picked=indices)
    assert_levels_match(indices, ref)
    groups = [list(range(3))] if shared else [[0], [1], [2]]
    for group, vq_before, vq_after in zip(groups, [layer.get_vq(g[0]) for g in groups],
                                          [probe.get_vq(g[0]) for g in groups]):
        idx = torch.cat([indices[k][ref.levels[k].cells] for k in group])
        vectors = torch.cat([ref.levels[k].pooled[ref.levels[k].cells] for k in group])
        counts = F.one_hot(idx, 6).to(F64)
        before = vq_before._codebook
        close(vq_after._codebook.cluster_size, 0.8 * before.cluster_size.to(F64) + 0.2 * counts.sum(0),
              rtol=1e-6, atol=1e-6)
        close(vq_after._codebook.embed_avg, 0.8 * before.embed_avg.to(F64) + 0.2 * counts.t() @ vectors,
              rtol=1e-5, atol=1e-6)


def test_lens_equals_the_mask():
    torch.manual_seed(0)
    layer = set_codebooks(HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 3, 6], **PLAIN), seed=55).eval()
    x = randn(2, 3, 6, seed=56)
    lens = torch.tensor([4, 6])
    by_lens = layer(x, lens=lens)
    by_mask = layer(x, mask=torch.arange(6) < lens[:, None])
    assert all(torch.equal(a, b) for a, b in zip(by_lens[1], by_mask[1])) and torch.equal(by_lens[0], by_mask[0])


def test_non_finite_training_input_raises_before_touching_buffers():
    for shared in (True, False):
        layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 2, 4], shared_codebook=shared).train()
        saved = buffer_state(layer)
        x = randn(2, 3, 4, seed=57)
        x[1, 0, 3] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            layer(x.requires_grad_(True))
        assert_buffers_equal(layer, saved)


def test_empty_batch():
    torch.manual_seed(0)
    layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, (2, 2)], accept_image_fmap=True, nested_dropout=0.5)
    saved = buffer_state(layer)
    for train in (True, False):
        x = torch.zeros(0, 3, 2, 2, requires_grad=train)
        out, indices, loss = layer.train(train)(x)
        assert out.shape == x.shape and [i.shape for i in indices] == [(0, 1, 1), (0, 2, 2)]
        assert loss == 0 and loss.dtype == torch.float32
        assert layer.get_output_from_indices(indices).shape == (0, 3, 2, 2)
    assert_buffers_equal(layer, saved)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_level"])
def test_all_masked_batch_is_zeros_and_leaves_the_statistics(shared):
    layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 2, 4], shared_codebook=shared).train()
    saved = buffer_state(layer)
    out, indices, loss = layer(randn(2, 3, 4, seed=58).requires_grad_(True), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert (out == 0).all() and loss == 0 and all((idx == -1).all() for idx in indices)
    assert_buffers_equal(layer, saved)


# ------------------------------------------------------------------------------------------
# dtype matrix and state dict


def _matrix_layer():
    return HierarchicalVQ(dim=4, codebook_size=16, scales=[1, 2, (3, 4)], accept_image_fmap=True,
                          nested_dropout=0.5, kmeans_init=False, threshold_ema_dead_code=0)


def _matrix_input(dtype):
    return randn(2, 4, 3, 4, seed=60).to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    res = run_cell(cell, _matrix_layer, _matrix_input, forward=lambda layer, x: layer(x, return_cutoff=True))
    assert [tuple(i.shape) for i in res.parts.indices] == [(2, 1, 1), (2, 2, 2), (2, 3, 4)]
    assert res.parts.output.shape == (2, 4, 3, 4) and len(res.parts.losses) == 1
    # the codes the step searched are those of the layer run_cell started from (seed 0); level 0
    # sees the input alone, later levels also the phi convolution, exact only in fp32 without autocast
    torch.manual_seed(0)
    start = _matrix_layer().to(DTYPES[cell.module_dtype]).float()
    indices = [i.cpu() for i in res.parts.indices]
    ref = reference(start, res.x.detach().float().cpu(), picked=indices)
    exact = cell.module_dtype == "fp32" and cell.autocast == "off"
    assert_levels_match(indices if exact else indices[:1], ref)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_level"])
def test_state_dict_round_trip_after_training(shared):
    torch.manual_seed(0)
    kwargs = dict(dim=3, codebook_size=8, scales=[1, 2, 4], shared_codebook=shared, share_quant_resi=0,
                  kmeans_iters=2)
    layer = HierarchicalVQ(**kwargs).train()
    for step in range(3):
        layer(randn(4, 3, 4, seed=70 + step).requires_grad_(True))
    state = layer.state_dict()
    assert state["vq._codebook.initted" if shared else "vqs.2._codebook.initted"]
    fresh = HierarchicalVQ(**kwargs)
    fresh.load_state_dict(state)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state[name]), name
    layer.eval(), fresh.eval()
    x = randn(2, 3, 4, seed=75)
    a, b = layer(x), fresh(x)
    assert torch.equal(a[0], b[0]) and all(torch.equal(i, j) for i, j in zip(a[1], b[1]))
    half = copy.deepcopy(layer).half()
    assert all(buf.dtype == torch.float32 for name, buf in half.named_buffers() if "initted" not in name)
    assert half.phi_levels[0].conv.weight.dtype == torch.float16


# ------------------------------------------------------------------------------------------
# the peer


PEER_CONFIGS = [
    dict(dim=4, codebook_size=12, scales=[1, 2, 5]),
    dict(dim=4, codebook_size=(8, 12, 16), scales=[1, (2, 3), (4, 5)], shared_codebook=False, accept_image_fmap=True,
         share_quant_resi=0, quant_resi=0.3),
    dict(dim=4, codebook_size=12, scales=[1, 2, 5], channel_first=False, share_quant_resi=2, nested_dropout=0.5),
]


@pytest.mark.parametrize("kwargs", PEER_CONFIGS, ids=range(len(PEER_CONFIGS)))
def test_same_state_dict_codes_and_outputs_as_peer(kwargs):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = {**kwargs, "kmeans_init": False, "threshold_ema_dead_code": 0}
    torch.manual_seed(0)
    peer = peer_module.HierarchicalVQ(**kwargs)
    ours = HierarchicalVQ(**kwargs)
    set_codebooks(ours, seed=80)
    assert set(ours.state_dict()) == set(peer.state_dict())
    peer.load_state_dict(ours.state_dict())  # strict, both ways
    ours.load_state_dict(peer.state_dict())
    spatial = (4, 5) if kwargs.get("accept_image_fmap") else (5,)
    x = randn(2, 4, *spatial, seed=81)
    x = x if kwargs.get("channel_first", True) else x.movedim(1, -1)
    peer.eval(), ours.eval()
    p_out, p_idx, _ = peer(x)
    o_out, o_idx, o_loss = ours(x)
    assert call_structure((o_out, *o_idx)) == call_structure((p_out, *p_idx))
    assert all(torch.equal(o, p.long()) for o, p in zip(o_idx, p_idx))
    close(o_out, p_out, rtol=1e-6, atol=1e-6)
    close(ours.get_output_from_indices(o_idx), peer.get_output_from_indices(p_idx), rtol=1e-6, atol=1e-6)
    if kwargs.get("shared_codebook", True) or kwargs.get("nested_dropout"):
        return  # the peer's shared codebook takes one EMA step per level (docs/migrating.md)
    # one training step of per-level codebooks: same codes, loss, EMA buffers and gradients
    peer.train(), ours.train()
    xp, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    p_out, p_idx, p_loss = peer(xp)
    o_out, o_idx, o_loss = ours(xo)
    assert all(torch.equal(o, p.long()) for o, p in zip(o_idx, p_idx))
    close(o_loss, p_loss.squeeze(), rtol=1e-5, atol=1e-7)
    (p_out.square().sum() + p_loss.sum()).backward()
    (o_out.square().sum() + o_loss).backward()
    close(xo.grad, xp.grad, rtol=1e-5, atol=1e-6)
    peer_params = dict(peer.named_parameters())
    for name, param in ours.named_parameters():
        close(param.grad, peer_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    peer_state = peer.state_dict()
    for name, buf in ours.state_dict().items():
        close(buf.float(), peer_state[name].float(), rtol=1e-5, atol=1e-6, msg=name)


def test_drop_in_signatures():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    for method in ("__init__", "forward", "get_output_from_indices"):
        theirs = set(inspect.signature(getattr(peer_module.HierarchicalVQ, method)).parameters)
        mine = set(inspect.signature(getattr(HierarchicalVQ, method)).parameters)
        assert theirs <= mine, f"{method} lacks {theirs - mine}"


# ------------------------------------------------------------------------------------------
# bad configuration and input


def _indices(layer, x):
    with torch.no_grad():  # no statistics update
        return layer(x)[1]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(accept_image_fmap=True, accept_3d_fmap=True), "accept_image_fmap"),
        (dict(scales=[]), "scales"),
        (dict(scales=[3, 2]), "non-decreasing"),
        (dict(scales=[0, 2]), "scales"),
        (dict(scales=[(1, 2)]), "scales"),
        (dict(scales=[1, 2], codebook_size=(8, 16)), "codebook_size"),
        (dict(scales=[1, 2], codebook_size=(8,), shared_codebook=False), "codebook_size"),
        (dict(nested_dropout=1.5), "nested_dropout"),
        (dict(nested_dropout_min_levels=0), "nested_dropout_min_levels"),
        (dict(dim=0), "dim"),
        (dict(share_quant_resi=1.5), "share_quant_resi"),
        (dict(decay=2.0), "decay"),
    ],
    ids=["two_fmaps", "no_scales", "decreasing", "zero_scale", "axes", "shared_sizes", "sizes_count", "dropout",
         "min_levels", "dim", "share_quant_resi", "decay"],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    base = dict(dim=4, codebook_size=8, scales=[1, 2])
    with pytest.raises((ValueError, TypeError), match=name):
        HierarchicalVQ(**{**base, **kwargs})


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, x: m(randn(2, 5, 6)), ValueError, "dim 4"),
        (lambda m, x: m(randn(2, 4, 6, 1)), ValueError, "3 dims"),
        (lambda m, x: m(torch.ones(2, 4, 6, dtype=torch.long)), TypeError, "input"),
        (lambda m, x: m(x.numpy()), TypeError, "input"),
        (lambda m, x: m(randn(2, 4, 0)), ValueError, "non-empty"),
        (lambda m, x: m(x, mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask"),
        (lambda m, x: m(x, mask=torch.ones(2, 6)), ValueError, "mask"),
        (lambda m, x: m(x, mask=torch.ones(2, 6, dtype=torch.bool), lens=torch.tensor([6, 6])), ValueError, "lens"),
        (lambda m, x: m(x, lens=torch.tensor([6.0, 6.0])), TypeError, "lens"),
        (lambda m, x: m(x, indices=torch.zeros(2, 6, dtype=torch.long)), ValueError, "indices"),
        (lambda m, x: m(x, sample_codebook_temp=-1.0), ValueError, "sample_codebook_temp"),
        (lambda m, x: m.get_output_from_indices(torch.zeros(2, 6, dtype=torch.long)), ValueError, "indices"),
        (lambda m, x: m.get_output_from_indices(_indices(m, x)[:2]), ValueError, "indices"),
        (lambda m, x: m.get_output_from_indices((*_indices(m, x)[:2], torch.zeros(2, 5, dtype=torch.long))),
         ValueError, r"indices\[2\]"),
        (lambda m, x: m.get_output_from_indices((*_indices(m, x)[:2], torch.full((2, 6), 8))), ValueError,
         r"indices\[2\].*\[0, 8\)"),
        (lambda m, x: m.get_output_from_indices((*_indices(m, x)[:2], torch.zeros(2, 6))), TypeError,
         r"indices\[2\]"),
    ],
    ids=["dim", "ndim", "int_input", "not_tensor", "empty_axis", "mask_shape", "mask_dtype", "mask_and_lens",
         "float_lens", "forward_indices", "temperature", "decode_not_tuple", "decode_count", "decode_shape",
         "decode_range", "decode_float"],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    """Raised before any buffer changes (the layer is in training)."""
    layer = HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 3, 6]).train()
    saved = buffer_state(layer)
    with pytest.raises(error, match=match):
        call(layer, randn(2, 4, 6))
    assert_buffers_equal(layer, saved)


def test_lens_on_images_raises():
    layer = HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 2], accept_image_fmap=True)
    with pytest.raises(ValueError, match="lens"):
        layer(randn(2, 4, 2, 2), lens=torch.tensor([2, 2]))


# ------------------------------------------------------------------------------------------
# distributed: 2 real gloo processes


def _gathered_equal(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _dist_worker(rank, world):
    # 1. two ranks on half batches == one process on the whole batch
    for shared in (True, False):
        torch.manual_seed(0)
        kwargs = dict(dim=3, codebook_size=8, scales=[1, 2, 5], shared_codebook=shared, **PLAIN)
        layer = HierarchicalVQ(**kwargs).train()
        single = HierarchicalVQ(**kwargs, sync_codebook=False).train()
        single.load_state_dict(layer.state_dict())
        for step in range(2):
            xs = [randn(2, 3, 5, seed=100 + 10 * step + r) for r in range(world)]
            masks = [randn(2, 5, seed=200 + 10 * step + r) > -0.7 for r in range(world)]
            layer(xs[rank].requires_grad_(True), mask=masks[rank])
            single(torch.cat(xs).requires_grad_(True), mask=torch.cat(masks))
        single_state = single.state_dict()
        for name, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{name} differs across ranks"
            torch.testing.assert_close(value, single_state[name], rtol=1e-5, atol=1e-6, msg=name)
        untrained = HierarchicalVQ(**kwargs).get_vq(0)._codebook.embed_avg
        assert not torch.equal(layer.get_vq(0)._codebook.embed_avg, untrained)
    # 2. k-means init, dead codes and nested dropout from per-rank random states: alike on every rank
    torch.manual_seed(0)  # the same weights (DDP would broadcast the phi convolution)
    layer = HierarchicalVQ(dim=3, codebook_size=8, scales=[1, 2, 5], nested_dropout=0.7, kmeans_iters=2).train()
    torch.manual_seed(10 + rank)
    for step in range(4):
        x = randn(2, 3, 5, seed=300 + 10 * step + rank) * (1 + rank)
        _, _, _, cutoff = layer(x.requires_grad_(True), return_cutoff=True)
        assert _gathered_equal(torch.tensor([-1 if cutoff is None else cutoff])), f"cutoffs differ at step {step}"
        for name, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{name} differs across ranks after step {step}"
    assert bool(layer.vq._codebook.initted)


@pytest.mark.timeout(180)
def test_distributed_half_batches_equal_one_process_and_ranks_agree():
    run_in_processes(_dist_worker, 2, timeout=150)
