"""VectorQuantize against independent fp64 references, the peer package, the dtype matrix.

The references are written here from the description of the scheme (VQ-VAE, arXiv 1711.00937,
with EMA codebooks; the rotation trick, arXiv 2410.06424; orthogonal regularization,
arXiv 2112.00384), never by calling the code under test:

- z = project_in(x) in fp64 with the layer's weights (`linear64`), split into heads
  (b, n, h, codebook_dim), L2-normalized with use_cosine_sim;
- index = argmin_k ||z - c_k||^2 (argmax z . c_k for cosine) over the head's codebook, brute
  force; rows whose two best scores are within NEAR_TIE (relative) are excluded as near-ties;
- EMA: counts = onehot.sum, sums = onehot^T z, cluster_size/embed_avg lerp towards them by
  1 - decay, codebook = embed_avg / ((cs + eps) / (total + K eps) * total);
- losses: commitment = mean (z - code)^2, cross-entropy of softmax(-||z - c||) to the chosen
  codes, diversity = -entropy(mean over tokens of softmax(-||z - c|| T)), orthogonal
  regularization ((Cn Cn^T)^2).sum() / K^2 - 1/K.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_in_processes
from dtype_matrix import DTYPES, dtype_matrix, run_cell
from reference import linear64, randn, rotation_vjp64
from vq_layers import VectorQuantize

F64 = torch.float64
NEAR_TIE = 1e-5
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ------------------------------------------------------------------------------------------
# fp64 reference


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.detach().to(F64), expected.detach().to(F64), rtol=rtol, atol=atol)


def tokens_of(layer, x):
    """User layout -> (b, n, dim) tokens (written here, not via vq_layers.layout)."""
    if x.ndim == 2:
        return x.unsqueeze(1)
    if layer.accept_image_fmap or layer.accept_3d_fmap or not layer.channel_last:
        return x.flatten(2).transpose(1, 2)
    return x


def z64(layer, tokens):
    """(b, n, dim) -> (b, n, heads, codebook_dim) fp64, as the codebook sees it (differentiable)."""
    z = linear64(layer.project_in, tokens) if layer.has_projections else tokens.to(F64)
    z = z.reshape(tokens.shape[0], tokens.shape[1], layer.heads, layer.codebook_dim)
    return F.normalize(z, dim=-1) if layer.use_cosine_sim else z


def head_codebooks(layer, codebook=None):
    """(heads, K, d) fp64: the codebook each head searches."""
    cb = (layer.codebook if codebook is None else codebook).detach().to(F64)
    return cb if layer.separate_codebook_per_head else cb.unsqueeze(0).expand(layer.heads, -1, -1)


def brute(layer, z, cbs):
    """z (b, n, h, d), cbs (h, K, d) fp64 -> indices (b, n, h), clear (b, n) (no near-tie in any head)."""
    if layer.use_cosine_sim:
        s = torch.einsum("bnhd,hkd->bnhk", z, cbs)
        top = s.topk(2, dim=-1).values
        scale = z.norm(dim=-1) * cbs.norm(dim=-1).amax(-1)
        gap = (top[..., 0] - top[..., 1]) / scale
        idx = s.argmax(-1)
    else:
        d2 = (z.unsqueeze(-2) - cbs).square().sum(-1)  # (b, n, h, K)
        top = d2.topk(2, dim=-1, largest=False).values
        gap = (top[..., 1] - top[..., 0]) / top[..., 1].clamp(min=1e-300)
        idx = d2.argmin(-1)
    return idx, (gap > NEAR_TIE).all(-1)


def as_bnh(layer, indices, b):
    """Indices as forward returns them -> (b, n, heads)."""
    return indices.reshape(b, -1, layer.heads)


def codes_at(cbs, idx):
    """cbs (h, K, d), idx (b, n, h) -> (b, n, h, d)."""
    h = cbs.shape[0]
    return cbs[torch.arange(h), idx.clamp(min=0)]


def buffers(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_buffers_equal(before, layer):
    after = layer.state_dict()
    assert set(before) == set(after)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{k} changed"


def smoothed64(cs, eps):
    k = cs.shape[-1]
    total = cs.sum(-1, keepdim=True)
    return (cs + eps) / (total + k * eps) * total


def rows_per_codebook(layer, z, idx, keep=None):
    """z (b, n, h, d), idx (b, n, h), keep (b, n) -> [(rows (m, d), indices (m,))] per codebook."""
    keep = torch.ones(z.shape[:2], dtype=torch.bool) if keep is None else keep
    if layer.separate_codebook_per_head:
        return [(z[:, :, h][keep], idx[:, :, h][keep]) for h in range(layer.heads)]
    return [(z[keep].reshape(-1, z.shape[-1]), idx[keep].reshape(-1))]


def ema_reference(layer, before, z, idx, keep=None):
    """One EMA step in fp64 from the buffers `before` -> cluster_size, embed_avg, embed (before
    dead-code replacement)."""
    cb = layer._codebook
    k, decay, eps = layer.codebook_size, cb.decay, cb.eps
    cs = before["_codebook.cluster_size"].to(F64).clone()
    ea = before["_codebook.embed_avg"].to(F64).clone()
    for g, (rows, ind) in enumerate(rows_per_codebook(layer, z, idx, keep)):
        if rows.shape[0] == 0:
            continue  # nothing seen: statistics stay
        onehot = F.one_hot(ind, k).to(F64)
        cs[g] = cs[g] * decay + onehot.sum(0) * (1 - decay)
        ea[g] = ea[g] * decay + (onehot.t() @ rows) * (1 - decay)
    embed = ea / smoothed64(cs, eps).unsqueeze(-1)
    if layer.use_cosine_sim:
        embed = F.normalize(embed, dim=-1)
    return cs, ea, embed


def check_training_step(layer, before, x, keep=None, indices=None):
    """Checks the buffers after one training step on x against the fp64 reference, dead codes
    included. Returns the mask of codes that died (g, K)."""
    tok = tokens_of(layer, x.detach())
    z = z64(layer, tok)
    cbs = head_codebooks(layer, before["_codebook.embed"].squeeze(0) if not layer.separate_codebook_per_head
                         else before["_codebook.embed"])
    idx, clear = brute(layer, z, cbs)
    kept = torch.ones(z.shape[:2], dtype=torch.bool) if keep is None else keep
    assert clear[kept].all(), "precondition: no near-tie in the batch"
    if indices is not None:
        got = as_bnh(layer, indices, x.shape[0])
        assert torch.equal(got[kept], idx[kept])
    cs, ea, embed = ema_reference(layer, before, z, idx, keep)
    cb = layer._codebook
    thr = cb.threshold_ema_dead_code
    dead = cs < thr if thr > 0 else torch.zeros_like(cs, dtype=torch.bool)
    live = ~dead
    close(cb.cluster_size[live], cs[live])
    close(cb.embed_avg[live], ea[live])
    close(cb.embed[live], embed[live])
    reset = cb.reset_cluster_size
    rows = rows_per_codebook(layer, z, idx, keep)
    for g, j in dead.nonzero().tolist():
        code = cb.embed[g, j].detach().to(F64)
        pool = rows[g][0]
        assert (pool - code).abs().amax(-1).min() < 1e-6, f"revived code {g},{j} is not a row of the batch"
        assert cb.cluster_size[g, j].item() == pytest.approx(reset, rel=1e-6)
        close(cb.embed_avg[g, j], code * reset)
    assert int(cb.dead_codes_replaced) == int(dead.sum())
    return dead


# ------------------------------------------------------------------------------------------
# indices against the fp64 brute force


CONFIGS = {
    "plain": dict(dim=8, codebook_size=32),
    "heads2_shared": dict(dim=8, codebook_size=16, heads=2, codebook_dim=4),
    "heads2_separate": dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "proj": dict(dim=10, codebook_size=16, codebook_dim=4),
    "heads3_proj_separate": dict(dim=10, codebook_size=12, heads=3, codebook_dim=3, separate_codebook_per_head=True),
    "cosine": dict(dim=8, codebook_size=16, use_cosine_sim=True),
    "cosine_heads_proj": dict(dim=10, codebook_size=16, heads=2, codebook_dim=4, use_cosine_sim=True),
}


def spread_codebook(layer, seed=3, scale=1.0):
    """Codes spread like the data (the default init is tiny): every code gets a chance."""
    shape = tuple(layer.codebook.shape)
    codes = randn(*shape, seed=seed, scale=scale)
    if layer.use_cosine_sim:
        codes = F.normalize(codes, dim=-1)
    layer.codebook = codes
    return layer


def check_indices(layer, x, indices, codebook_before, min_clear=0.8):
    tok = tokens_of(layer, x.detach())
    z = z64(layer, tok)
    idx, clear = brute(layer, z, head_codebooks(layer, codebook_before))
    assert clear.float().mean() >= min_clear
    got = as_bnh(layer, indices, x.shape[0])
    assert torch.equal(got[clear], idx[clear])
    return idx, clear


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_indices_equal_brute_force(name, train):
    torch.manual_seed(0)
    layer = VectorQuantize(**CONFIGS[name])
    spread_codebook(layer)
    layer.train(train)
    x = randn(3, 20, layer.dim, seed=1)
    cb = layer.codebook.detach().clone()
    out, indices, loss = layer(x)
    assert indices.dtype == torch.long and out.dtype == torch.float32 and out.shape == x.shape
    expected_shape = (3, 20) if layer.heads == 1 else (3, 20, layer.heads)
    assert tuple(indices.shape) == expected_shape
    idx, _ = check_indices(layer, x, indices, cb)
    assert idx.unique().numel() > 3  # not a trivial one-code answer


@pytest.mark.parametrize("default_init", [False, True])
def test_indices_with_default_init(default_init):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=64).eval()
    if not default_init:
        spread_codebook(layer)
    x = randn(2, 30, 6, seed=2)
    cb = layer.codebook.detach().clone()
    check_indices(layer, x, layer(x)[1], cb)


LAYOUTS = {
    "seq": (dict(), (2, 7, "d")),
    "single": (dict(), (5, "d")),
    "channel_first": (dict(channel_last=False), (2, "d", 7)),
    "image": (dict(accept_image_fmap=True), (2, "d", 3, 4)),
    "video": (dict(accept_3d_fmap=True), (2, "d", 2, 3, 2)),
}


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout, heads):
    kwargs, shape = LAYOUTS[layout]
    dim = 6
    torch.manual_seed(0)
    layer = VectorQuantize(dim=dim, codebook_size=16, heads=heads, codebook_dim=dim // heads, **kwargs)
    spread_codebook(layer).eval()
    shape = tuple(dim if s == "d" else s for s in shape)
    x = randn(*shape, seed=4)
    cb = layer.codebook.detach().clone()
    out, indices, _ = layer(x)
    assert out.shape == x.shape
    b = shape[0]
    spatial = {"seq": (7,), "single": (), "channel_first": (7,), "image": (3, 4), "video": (2, 3, 2)}[layout]
    assert tuple(indices.shape) == (b, *spatial) + ((heads,) if heads > 1 else ())
    idx, _ = check_indices(layer, x, indices, cb, min_clear=0.7)
    # the output holds the chosen codes in the input's layout
    codes = codes_at(head_codebooks(layer, cb), idx).reshape(b, -1, dim)  # (b, n, dim)
    expect = codes.reshape(b, *spatial, dim)
    if layout in ("channel_first", "image", "video"):
        expect = expect.movedim(-1, 1)
    if layout == "single":
        expect = expect.reshape(b, dim)
    close(out, expect, rtol=0, atol=0)


@pytest.mark.parametrize("heads,separate", [(1, False), (2, True)])
def test_image_indices_with_projection(heads, separate):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=5, codebook_size=16, heads=heads, codebook_dim=3, accept_image_fmap=True,
                           separate_codebook_per_head=separate)
    spread_codebook(layer).train()
    x = randn(2, 5, 4, 3, seed=5)
    cb = layer.codebook.detach().clone()
    out, indices, _ = layer(x)
    assert out.shape == x.shape
    assert tuple(indices.shape) == (2, 4, 3) + ((heads,) if heads > 1 else ())
    check_indices(layer, x, indices, cb)


# ------------------------------------------------------------------------------------------
# the dtype matrix


DM_CONFIGS = {
    "plain": dict(dim=8, codebook_size=16),
    "heads_proj": dict(dim=12, codebook_size=16, heads=2, codebook_dim=4),
    "cosine": dict(dim=8, codebook_size=16, use_cosine_sim=True),
    "kmeans_dead": dict(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2),
    "losses": dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True,
                   commitment_use_cross_entropy_loss=True, codebook_diversity_loss_weight=0.1,
                   orthogonal_reg_weight=0.1),
}


@pytest.mark.parametrize("cell", dtype_matrix())
@pytest.mark.parametrize("name", list(DM_CONFIGS))
def test_dtype_matrix(name, cell):
    kwargs = DM_CONFIGS[name]
    res = run_cell(cell, lambda: VectorQuantize(**kwargs), lambda dt: randn(2, 10, kwargs["dim"], seed=6).to(dt),
                   forward=lambda layer, x: layer(x, return_loss_breakdown=True))
    indices = res.parts.indices[0]
    assert tuple(indices.shape) == (2, 10) + ((kwargs["heads"],) if kwargs.get("heads", 1) > 1 else ())
    assert indices.min() >= 0 and indices.max() < kwargs["codebook_size"]
    assert len(res.parts.losses) == 5  # total + the breakdown


@pytest.mark.parametrize("cell", dtype_matrix())
@pytest.mark.parametrize("name", ["plain", "heads2_shared"])
def test_dtype_matrix_indices_equal_fp32_brute_force(name, cell):
    kwargs = CONFIGS[name]
    snap = {}

    def make():
        torch.manual_seed(0)
        return spread_codebook(VectorQuantize(**kwargs))

    def forward(layer, x):
        snap["cb"] = layer.codebook.detach().clone()
        return layer(x)

    res = run_cell(cell, make, lambda dt: randn(2, 16, kwargs["dim"], seed=7).to(dt), forward=forward)
    # the input as given (in its dtype) is exact in fp64; the codebook is an fp32 buffer
    check_indices(res.layer, res.x.detach(), res.parts.indices[0], snap["cb"], min_clear=0.9)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("input_dtype", ["fp32", "fp16"])
def test_fp16_autocast_large_norms(input_dtype, train):
    """||x||^2 far above fp16's 65504: the search must not form distances in fp16."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=8, codebook_size=32)
    layer.codebook = randn(32, 8, seed=8, scale=300.0)
    layer.train(train)
    x = (randn(2, 24, 8, seed=9) * 300).to(DTYPES[input_dtype])
    assert (x.float().square().sum(-1) > 65504 * 4).float().mean() > 0.5
    cb = layer.codebook.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        out, indices, loss = layer(x)
    assert out.dtype == x.dtype and torch.isfinite(out).all() and torch.isfinite(loss)
    idx, clear = check_indices(layer, x, indices, cb, min_clear=0.9)
    codes = codes_at(head_codebooks(layer, cb), idx).reshape(out.shape)
    close(out[clear], codes.to(x.dtype)[clear], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# EMA statistics


EMA_CONFIGS = {
    "plain": dict(dim=6, codebook_size=12),
    "decay_eps": dict(dim=6, codebook_size=12, decay=0.5, eps=0.1),
    "heads_shared": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3),
    "heads_separate_proj": dict(dim=7, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=True),
    "cosine": dict(dim=6, codebook_size=12, use_cosine_sim=True),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(EMA_CONFIGS))
def test_ema_step_equals_one_hot_reference(name, masked):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**EMA_CONFIGS[name])).train()
    # statistics that are not the trivial ones
    with torch.no_grad():
        layer._codebook.cluster_size.copy_(randn(*layer._codebook.cluster_size.shape, seed=10).abs() + 0.5)
        layer._codebook.embed_avg.copy_(randn(*layer._codebook.embed_avg.shape, seed=11))
    x = randn(3, 15, layer.dim, seed=12)
    keep = (torch.rand(3, 15, generator=torch.Generator().manual_seed(13)) > 0.3) if masked else None
    before = buffers(layer)
    out, indices, loss = layer(x, mask=keep)
    check_training_step(layer, before, x, keep, indices)
    # and the codebook actually moved
    assert not torch.equal(layer._codebook.embed, before["_codebook.embed"])


@pytest.mark.parametrize("convert", ["bfloat16", "half"])
def test_buffers_stay_fp32(convert):
    torch.manual_seed(0)
    layer = getattr(VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, threshold_ema_dead_code=1.0), convert)()
    cb = layer._codebook
    for name in ("embed", "embed_avg", "cluster_size"):
        assert getattr(cb, name).dtype == torch.float32
    assert layer.project_in.weight.dtype == DTYPES["bf16" if convert == "bfloat16" else "fp16"]
    x = randn(2, 9, 8, seed=14).to(layer.project_in.weight.dtype)
    out, _, loss = layer.train()(x)
    assert out.dtype == x.dtype and loss.dtype == torch.float32
    for name in ("embed", "embed_avg", "cluster_size"):
        assert getattr(cb, name).dtype == torch.float32
        assert torch.isfinite(getattr(cb, name)).all()


PEER_CONFIGS = {
    "plain": dict(dim=6, codebook_size=12),
    "heads_shared": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3),
    "separate": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=True),
    "cosine": dict(dim=6, codebook_size=12, use_cosine_sim=True),
    "decay": dict(dim=6, codebook_size=12, decay=0.9, eps=1e-3),
}


@pytest.mark.parametrize("name", list(PEER_CONFIGS))
def test_same_indices_and_ema_as_vector_quantize_pytorch(name):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(PEER_CONFIGS[name], kmeans_init=False, rotation_trick=False)
    torch.manual_seed(0)
    peer = peer_module.VectorQuantize(**kwargs)
    ours = VectorQuantize(**kwargs)
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict())  # strict
    x = randn(2, 20, kwargs["dim"], seed=15)
    peer.train(), ours.train()
    for step in range(2):
        xs = x + 0.1 * step
        _, p_idx, _ = peer(xs)
        _, o_idx, _ = ours(xs)
        assert torch.equal(o_idx, p_idx.long())
        for key in ("embed", "embed_avg", "cluster_size"):
            close(ours._codebook.state_dict()[key], peer._codebook.state_dict()[key], rtol=1e-5, atol=1e-5)
    # and back: strict both ways
    peer2 = peer_module.VectorQuantize(**kwargs)
    peer2.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(peer2.state_dict()[key].to(value.dtype), value)


# ------------------------------------------------------------------------------------------
# indices -> codes / output, the codebook property


OUT_CONFIGS = {
    "plain": (dict(dim=6, codebook_size=16), (2, 9, 6)),
    "proj": (dict(dim=7, codebook_size=16, codebook_dim=3), (2, 9, 7)),
    "heads_proj": (dict(dim=7, codebook_size=16, heads=2, codebook_dim=3), (2, 9, 7)),
    "heads_separate": (dict(dim=6, codebook_size=16, heads=2, codebook_dim=3, separate_codebook_per_head=True), (2, 9, 6)),
    "image_heads": (dict(dim=6, codebook_size=16, heads=2, codebook_dim=3, accept_image_fmap=True), (2, 6, 3, 4)),
    "image_proj": (dict(dim=5, codebook_size=16, codebook_dim=3, accept_image_fmap=True), (2, 5, 3, 4)),
    "channel_first": (dict(dim=6, codebook_size=16, channel_last=False), (2, 6, 9)),
    "cosine": (dict(dim=6, codebook_size=16, use_cosine_sim=True), (2, 9, 6)),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(OUT_CONFIGS))
def test_get_output_from_indices_equals_eval_forward_bitwise(name, masked):
    kwargs, shape = OUT_CONFIGS[name]
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**kwargs)).eval()
    x = randn(*shape, seed=16)
    mask = None
    if masked:
        spatial = shape[2:] if (kwargs.get("accept_image_fmap") or not kwargs.get("channel_last", True)) else shape[1:2]
        mask = torch.rand(shape[0], *spatial, generator=torch.Generator().manual_seed(17)) > 0.3
    out, indices, _ = layer(x, mask=mask)
    rebuilt = layer.get_output_from_indices(indices)
    assert rebuilt.shape == out.shape and rebuilt.dtype == out.dtype
    assert torch.equal(rebuilt, out)
    if masked:
        heads_axis = (indices < 0) if layer.heads == 1 else (indices < 0).all(-1)
        assert torch.equal(heads_axis, ~mask)
        flat = tokens_of(layer, out)
        assert (flat.reshape(-1, flat.shape[-1])[(~mask).reshape(-1)] == 0).all()


def test_get_output_from_indices_dtype():
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(dim=6, codebook_size=16)).eval()
    x = randn(2, 5, 6, seed=18).bfloat16()
    out, indices, _ = layer(x)
    assert torch.equal(layer.get_output_from_indices(indices, dtype=torch.bfloat16), out)


@pytest.mark.parametrize("name", ["plain", "heads_separate", "heads_proj", "image_heads", "channel_first"])
def test_get_codes_from_indices(name):
    kwargs, shape = OUT_CONFIGS[name]
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**kwargs)).eval()
    x = randn(*shape, seed=19)
    _, indices, _ = layer(x)
    codes = layer.get_codes_from_indices(indices)
    b = shape[0]
    idx = as_bnh(layer, indices, b)
    expect = codes_at(head_codebooks(layer), idx).reshape(b, -1, layer.heads * layer.codebook_dim)
    spatial = tuple(indices.shape[1:-1] if layer.heads > 1 else indices.shape[1:])
    expect = expect.reshape(b, *spatial, -1)
    if kwargs.get("accept_image_fmap") or not kwargs.get("channel_last", True):
        expect = expect.movedim(-1, 1)
    assert codes.shape == expect.shape
    close(codes, expect, rtol=0, atol=0)
    # -1 -> zeros
    assert (layer.get_codes_from_indices(torch.full_like(indices, -1)) == 0).all()


@pytest.mark.parametrize("separate", [False, True])
def test_codebook_property_and_setter(separate):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=separate)
    expected_shape = (2, 10, 3) if separate else (10, 3)
    assert tuple(layer.codebook.shape) == expected_shape
    old_embed_avg = layer._codebook.embed_avg.clone()
    new = randn(*expected_shape, seed=20, scale=2.0)
    layer.codebook = new
    assert torch.equal(layer.codebook, new)
    with pytest.raises(ValueError, match="codebook"):
        layer.codebook = torch.zeros(11, 3)
    # eval forward uses the new codes
    x = randn(2, 12, 6, seed=21, scale=2.0)
    _, indices, _ = layer.eval()(x)
    check_indices(layer, x, indices, new)
    # the statistics describe the new codes: a training step starts from them
    cs = layer._codebook.cluster_size.to(F64)
    close(layer._codebook.embed_avg / smoothed64(cs, layer._codebook.eps).unsqueeze(-1),
          new.to(F64).reshape(layer._codebook.embed.shape), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer._codebook.embed_avg, old_embed_avg)
    before = buffers(layer)
    layer.train()
    _, indices, _ = layer(x[:, :3])  # few vectors: most codes unused in this step
    check_training_step(layer, before, x[:, :3], indices=indices)
    used = torch.zeros(layer._codebook.embed.shape[:2], dtype=torch.bool)
    idx = as_bnh(layer, indices, 2)
    for h in range(2):
        used[h if separate else 0, idx[..., h].reshape(-1)] = True
    new_g = new.reshape(layer._codebook.embed.shape)
    # unused codes stay (almost) at the new codes, not pulled back to the old statistics
    close(layer._codebook.embed[~used], new_g[~used], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------
# masks and lens


MASK_CONFIGS = {
    "plain": dict(dim=6, codebook_size=12),
    "heads_proj": dict(dim=7, codebook_size=12, heads=2, codebook_dim=3),
    "losses": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=True,
                   commitment_use_cross_entropy_loss=True, codebook_diversity_loss_weight=0.3),
    "cosine": dict(dim=6, codebook_size=12, use_cosine_sim=True),
}


@pytest.mark.parametrize("how", ["mask", "lens"])
@pytest.mark.parametrize("name", list(MASK_CONFIGS))
def test_mask_equals_running_on_the_kept_prefix(name, how):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**MASK_CONFIGS[name])).train()
    alone = copy.deepcopy(layer)
    lens = torch.tensor([10, 4, 7])
    mask = torch.arange(10) < lens[:, None]
    x = randn(3, 10, layer.dim, seed=22)
    x_padded = x.clone()
    x_padded[~mask] = float("nan")  # padding never enters (NaN included)
    kw = dict(mask=mask) if how == "mask" else dict(lens=lens)
    before = buffers(layer)
    out, indices, loss, breakdown = layer(x_padded, return_loss_breakdown=True, **kw)
    kept = torch.cat([x[i, : lens[i]] for i in range(3)])[None]  # (1, total, d)
    out_a, indices_a, loss_a, breakdown_a = alone(kept, return_loss_breakdown=True)
    assert torch.equal(out[mask], out_a[0])
    assert torch.equal(indices[mask], indices_a[0])
    assert (indices[~mask] == -1).all()
    assert (out[~mask] == 0).all()
    close(loss, loss_a, rtol=1e-5, atol=1e-7)
    for a, b in zip(breakdown, breakdown_a):
        close(a, b, rtol=1e-5, atol=1e-7)
    for key in ("cluster_size", "embed_avg", "embed"):
        close(layer._codebook.state_dict()[key], alone._codebook.state_dict()[key], rtol=1e-5, atol=1e-6)
    check_training_step(layer, before, x, mask, indices)


def test_masked_output_is_the_input_without_zeros_for_padding():
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(dim=6, codebook_size=12, codebook_dim=4,
                                           return_zeros_for_masked_padding=False)).eval()
    x = randn(2, 8, 6, seed=23)
    mask = torch.arange(8) < torch.tensor([[5], [2]])
    out, indices, _ = layer(x, mask=mask)
    assert torch.equal(out[~mask], x[~mask])
    assert (indices[~mask] == -1).all()
    assert not torch.equal(out[mask], x[mask])


def test_image_mask():
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(dim=6, codebook_size=12, accept_image_fmap=True)).eval()
    x = randn(2, 6, 3, 4, seed=24)
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(25)) > 0.4
    cb = layer.codebook.detach().clone()
    out, indices, _ = layer(x, mask=mask)
    assert indices.shape == (2, 3, 4)
    assert (indices[~mask] == -1).all()
    assert (out.movedim(1, -1)[~mask] == 0).all()
    idx, clear = brute(layer, z64(layer, tokens_of(layer, x)), head_codebooks(layer, cb))
    m = mask.reshape(2, -1) & clear
    assert torch.equal(indices.reshape(2, -1)[m], idx[..., 0][m])


@pytest.mark.parametrize("kmeans_init", [False, True])
@pytest.mark.parametrize("case", ["all_masked", "empty", "empty_lens"])
def test_all_masked_and_empty_batches_change_nothing(case, kmeans_init):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8, kmeans_init=kmeans_init, threshold_ema_dead_code=1.0,
                           commitment_use_cross_entropy_loss=True, codebook_diversity_loss_weight=0.5).train()
    before = buffers(layer)
    if case == "all_masked":
        x = randn(2, 5, 6, seed=26)
        kw = dict(mask=torch.zeros(2, 5, dtype=torch.bool))
    elif case == "empty":
        x, kw = torch.zeros(2, 0, 6), {}
    else:
        x, kw = randn(2, 5, 6, seed=26), dict(lens=torch.tensor([0, 0]))
    x.requires_grad_(True)
    out, indices, loss, breakdown = layer(x, return_loss_breakdown=True, **kw)
    assert out.shape == x.shape and torch.isfinite(out).all() and (out == 0).all()
    assert (indices == -1).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() == 0
    for t in breakdown:
        assert torch.isfinite(t) and t.item() == 0
    assert_buffers_equal(before, layer)
    assert int(layer._codebook.dead_codes_replaced) == 0
    # an ordinary batch afterwards still works (and initializes with kmeans_init)
    layer(randn(2, 5, 6, seed=27))
    assert bool(layer._codebook.initted)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", [(2, 0, 6), (0, 5, 6)])
@pytest.mark.parametrize("heads", [1, 2])
def test_empty_batch_shapes(shape, heads, train):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8, heads=heads, codebook_dim=6 // heads).train(train)
    before = buffers(layer)
    out, indices, loss = layer(torch.zeros(shape))
    assert out.shape == shape
    assert tuple(indices.shape) == shape[:2] + ((heads,) if heads > 1 else ())
    assert indices.dtype == torch.long and loss.item() == 0
    assert_buffers_equal(before, layer)


# ------------------------------------------------------------------------------------------
# dead codes and k-means init


def far_codebook(layer, near, seed=28):
    """The first `near` codes on the data's scale, the rest far away (never chosen)."""
    k, d = layer.codebook_size, layer.codebook_dim
    codes = randn(k, d, seed=seed)
    codes[near:] = 1000 + randn(k - near, d, seed=seed + 1)
    layer.codebook = codes
    return codes


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_compile_fullgraph_after_loading_a_checkpoint(kmeans_init):
    """Loading reads `initted` eagerly: the first compiled training step after it needs no host
    sync (k-means already ran in the checkpoint's model)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    trained = VectorQuantize(dim=16, codebook_size=32, kmeans_init=kmeans_init).train()
    trained(randn(2, 40, 16, seed=72))
    restored = VectorQuantize(dim=16, codebook_size=32, kmeans_init=kmeans_init).train()
    restored.load_state_dict(trained.state_dict())
    x = randn(2, 40, 16, seed=73)
    got = torch.compile(restored, fullgraph=True, backend="aot_eager")(x)
    want = trained(x)
    assert got[1].equal(want[1])
    torch.testing.assert_close(restored._codebook.embed, trained._codebook.embed)


def test_kmeans_runs_again_after_initted_is_reset_by_hand():
    """`initted.fill_(False)` (the peer's idiom to redo k-means) is noticed: the next training
    step runs k-means on its batch, and `initted` is True again (a checkpoint saved then does
    not redo k-means when loaded)."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=8, codebook_size=4, kmeans_init=True).train()
    layer(randn(1, 64, 8, seed=74))
    layer._codebook.initted.fill_(False)
    layer(randn(1, 64, 8, seed=75) - 100)
    assert bool(layer._codebook.initted)
    assert layer._codebook.embed.mean().item() < -50  # k-means on the shifted batch


def test_masked_padding_does_not_cost_the_kept_rows_accuracy():
    """Data and codes around 1000, half the batch padding (zeroed before the search): the mask
    reaches the search's centring, so the kept rows still get their fp64 nearest codes (with
    the padding in the centre: 1415 of 2000 wrong)."""
    layer = VectorQuantize(dim=32, codebook_size=1024).eval()
    layer.codebook = 1000 + randn(1024, 32, seed=70)
    x = 1000 + randn(2, 2000, 32, seed=71)
    mask = torch.zeros(2, 2000, dtype=torch.bool)
    mask[0] = True
    _, indices, _ = layer(x, mask=mask)
    distances = (x[0, :, None].double() - layer.codebook.double()[None]).square().sum(-1)
    two = distances.topk(2, dim=-1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) / two[:, 1] >= 1e-6
    assert clear.float().mean() > 0.99
    assert indices[0][clear].equal(distances.argmin(-1)[clear])
    assert (indices[1] == -1).all()


@pytest.mark.parametrize("reset", [None, 2.0])
def test_dead_codes_revive_from_the_batch(reset):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=10, threshold_ema_dead_code=0.85, reset_cluster_size=reset).train()
    old = far_codebook(layer, near=4)
    x = randn(2, 32, 4, seed=29)
    before = buffers(layer)
    _, indices, _ = layer(x)
    dead = check_training_step(layer, before, x, indices=indices)
    assert dead[0, 4:].all() and not dead[0, :4].any()
    assert int(layer._codebook.dead_codes_replaced) == 6
    revived = layer._codebook.embed[0, 4:]
    assert (revived - old[4:]).norm(dim=-1).min() > 500
    # the next EMA step starts from the revived statistics, not from the old far codes
    before = buffers(layer)
    _, indices, _ = layer(x)
    dead = check_training_step(layer, before, x, indices=indices)
    assert not dead.any()
    assert layer._codebook.embed[0, 4:].norm(dim=-1).max() < 10


def test_dead_codes_after_kmeans_init():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, threshold_ema_dead_code=3.0,
                           decay=0.5).train()
    centers = randn(4, 4, seed=30, scale=5.0)
    a = centers.repeat_interleave(10, 0)[None] + 0.2 * randn(1, 40, 4, seed=31)
    layer(a)  # k-means init + first step
    assert bool(layer._codebook.initted)
    # a batch in two of the four clusters: the codes of the other two die
    b = centers[:2].repeat_interleave(30, 0)[None] + 0.2 * randn(1, 60, 4, seed=32)
    died = torch.zeros(1, 8, dtype=torch.bool)
    for step in range(3):
        before = buffers(layer)
        _, indices, _ = layer(b)
        died |= check_training_step(layer, before, b, indices=indices)
    assert died.any()


def test_kmeans_init_runs_after_loading_an_uninitialized_state():
    """The layer remembers on the host that init ran (no host sync per step); a loaded state
    whose `initted` is False makes the next training step run k-means again."""
    torch.manual_seed(0)
    fresh = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True)
    layer = copy.deepcopy(fresh).train()
    layer(randn(1, 40, 4, seed=35))
    assert bool(layer._codebook.initted)
    layer.load_state_dict(fresh.state_dict())
    assert not bool(layer._codebook.initted)
    layer(randn(1, 40, 4, seed=36))
    assert bool(layer._codebook.initted) and layer.codebook.norm(dim=-1).min() > 0


def test_kmeans_init_lowers_quantization_error():
    """Over a few seeds (k-means from random rows can end in a local minimum on one of them)."""
    centers = randn(4, 4, seed=33, scale=4.0)
    g = torch.Generator().manual_seed(34)
    x = (centers.repeat_interleave(30, 0) + 0.3 * torch.randn(120, 4, generator=g))[None]

    def error(codebook):
        cb = codebook.detach().to(F64)
        return (x[0].to(F64).unsqueeze(1) - cb).square().sum(-1).min(-1).values.mean().item()

    optimum = error(centers)
    errors = {False: [], True: []}
    for seed in range(4):
        for kmeans_init in (False, True):
            torch.manual_seed(seed)
            layer = VectorQuantize(dim=4, codebook_size=8, kmeans_init=kmeans_init).train()
            layer(x)
            errors[kmeans_init].append(error(layer.codebook))
    assert sum(errors[True]) < 0.5 * sum(errors[False])
    assert sorted(errors[True])[2] < 1.5 * optimum  # most seeds find the clusters


# ------------------------------------------------------------------------------------------
# train / eval consistency


@pytest.mark.parametrize("kmeans_init", [False, True])
@pytest.mark.parametrize("mode", ["eval", "no_grad", "freeze_ctor", "freeze_kwarg", "given_indices"])
def test_no_buffer_changes_without_an_update(mode, kmeans_init):
    torch.manual_seed(0)
    kwargs = dict(dim=6, codebook_size=8, kmeans_init=kmeans_init, threshold_ema_dead_code=5.0,
                  orthogonal_reg_weight=0.1, codebook_diversity_loss_weight=0.1)
    layer = VectorQuantize(**kwargs, freeze_codebook=mode == "freeze_ctor")
    x = randn(2, 10, 6, seed=35)
    before = buffers(layer)
    kw = dict(freeze_codebook=True) if mode == "freeze_kwarg" else {}
    if mode == "given_indices":
        kw = dict(indices=torch.zeros(2, 10, dtype=torch.long))
    layer.train(mode != "eval")
    if mode == "no_grad":
        with torch.no_grad():
            layer(x)
    else:
        layer(x, **kw)
    assert_buffers_equal(before, layer)


@pytest.mark.parametrize("name", ["plain", "heads2_shared", "heads2_separate", "cosine"])
def test_training_output_is_the_codebook_before_the_step(name):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**CONFIGS[name])).train()
    x = randn(2, 12, layer.dim, seed=36).requires_grad_(True)
    cb = head_codebooks(layer).to(torch.float32).clone()
    out, indices, _ = layer(x)
    assert not torch.equal(head_codebooks(layer).float(), cb)  # the step moved it
    idx = as_bnh(layer, indices, 2)
    expect = codes_at(cb, idx).reshape(out.shape)
    assert torch.equal(out, expect)


# ------------------------------------------------------------------------------------------
# losses


def kept_or_all(z, keep):
    return z.reshape(-1, *z.shape[2:]) if keep is None else z[keep]


def logits64(z, cbs, cosine, scale=1.0):
    """z (m, h, d), cbs (h, K, d) -> (m, h, K): -||z - c|| (Euclidean) or z . c, times scale."""
    if cosine:
        return torch.einsum("mhd,hkd->mhk", z, cbs) * scale
    return -(z.unsqueeze(-2) - cbs).square().sum(-1).sqrt() * scale


COMMIT_CONFIGS = {
    "plain": dict(dim=6, codebook_size=12),
    "heads_proj": dict(dim=7, codebook_size=12, heads=2, codebook_dim=3),
    "separate": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=True),
    "cosine": dict(dim=6, codebook_size=12, use_cosine_sim=True),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(COMMIT_CONFIGS))
def test_commitment_loss(name, masked):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name], commitment_weight=0.7)).train()
    x = randn(3, 10, layer.dim, seed=37).requires_grad_(True)
    keep = (torch.rand(3, 10, generator=torch.Generator().manual_seed(38)) > 0.3) if masked else None
    cbs = head_codebooks(layer).clone()
    _, _, loss, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    z = z64(layer, x64)
    idx, clear = brute(layer, z.detach(), cbs)
    assert clear.all()
    zk, ck = kept_or_all(z, keep), kept_or_all(codes_at(cbs, idx), keep)
    expected = (zk - ck).square().mean()
    close(breakdown.commitment, expected)
    close(loss, 0.7 * expected)
    # its gradient to the input (the codes are constants)
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(0.7 * expected, x64)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(COMMIT_CONFIGS))
def test_cross_entropy_commitment_loss(name, masked):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name], commitment_use_cross_entropy_loss=True)).train()
    x = randn(3, 10, layer.dim, seed=39).requires_grad_(True)
    keep = (torch.rand(3, 10, generator=torch.Generator().manual_seed(40)) > 0.3) if masked else None
    cbs = head_codebooks(layer).clone()
    _, _, loss, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    z = z64(layer, x64)
    idx, clear = brute(layer, z.detach(), cbs)
    assert clear.all()
    logp = logits64(kept_or_all(z, keep), cbs, layer.use_cosine_sim).log_softmax(-1)
    expected = -logp.gather(-1, kept_or_all(idx, keep).unsqueeze(-1)).mean()
    close(breakdown.commitment, expected)
    close(loss, expected)
    # its gradient to the input: the softmax over the codebook the codes were chosen from
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x64)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 100.0])
@pytest.mark.parametrize("name", ["plain", "heads_proj", "separate", "cosine"])
def test_codebook_diversity_loss(name, temperature):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name], commitment_weight=0.0,
                                           codebook_diversity_loss_weight=0.3,
                                           codebook_diversity_temperature=temperature)).train()
    x = randn(3, 10, layer.dim, seed=41).requires_grad_(True)
    keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(42)) > 0.2
    cbs = head_codebooks(layer).clone()
    _, _, loss, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    p = logits64(kept_or_all(z64(layer, x64), keep), cbs, layer.use_cosine_sim, temperature).softmax(-1)  # (m, h, K)
    if layer.separate_codebook_per_head:
        avg = p.mean(0)  # (h, K): one distribution per codebook
    else:
        avg = p.reshape(-1, p.shape[-1]).mean(0, keepdim=True)  # heads pooled on one codebook
    expected = (torch.special.xlogy(avg, avg).sum(-1)).mean()  # -entropy
    close(breakdown.codebook_diversity, expected, rtol=1e-5, atol=1e-6)
    close(loss, 0.3 * expected, rtol=1e-5, atol=1e-6)
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(0.3 * expected, x64)[0], rtol=1e-4, atol=1e-7)


def test_codebook_diversity_gradient_is_finite_with_an_unreachable_code():
    """At the default temperature (100) a code far from every token has mean probability 0 in
    fp32; the loss's true gradient is finite (p log p -> 0 smoothly), so must be the layer's."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=6, commitment_weight=0.0, codebook_diversity_loss_weight=1.0,
                           freeze_codebook=True).train()
    codes = randn(6, 4, seed=60)
    codes[5] += 50.0
    layer.codebook = codes
    x = randn(2, 8, 4, seed=61).requires_grad_(True)
    _, _, loss = layer(x)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    x64 = x.detach().to(F64).requires_grad_(True)
    p = logits64(x64.reshape(-1, 1, 4), codes.to(F64)[None], False, 100.0).softmax(-1).reshape(-1, 6)
    avg = p.mean(0)
    # the far code's mean probability underflows even in fp64 (exp(-5000)): its term's exact
    # gradient is 0, which xlogy's backward at p = 0 would turn into -inf * 0 = NaN
    expected = torch.special.xlogy(avg, avg.clamp(min=torch.finfo(F64).tiny)).sum()
    close(loss, expected)
    (ref,) = torch.autograd.grad(expected, x64)
    assert torch.isfinite(ref).all()
    close(grad, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("active_only", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_orthogonal_regularization(active_only, separate):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=separate,
                           commitment_weight=0.0, orthogonal_reg_weight=2.0,
                           orthogonal_reg_active_codes_only=active_only)
    spread_codebook(layer).train()
    cbs = layer._codebook.embed.detach().to(F64).clone().requires_grad_()  # (g, K, d)
    x = randn(2, 4, 6, seed=43)  # few vectors: not every code is active
    _, indices, loss, breakdown = layer(x, return_loss_breakdown=True)
    idx = as_bnh(layer, indices, 2)
    losses = []
    for g in range(cbs.shape[0]):
        c = cbs[g]
        if active_only:
            used = idx[..., g].unique() if separate else idx.unique()
            assert used.numel() < 12
            c = c[used]
        cn = c / c.norm(dim=-1, keepdim=True)
        k = cn.shape[0]
        losses.append((cn @ cn.t()).square().sum() / k**2 - 1 / k)
    expected = torch.stack(losses).mean()
    close(breakdown.orthogonal_reg, expected)
    close(loss, 2.0 * expected.detach())
    # it reaches the codebook as the gradient of the codebook this step searched, although the
    # step's EMA update rewrote the codes before the backward ran
    loss.backward()
    (2.0 * expected).backward()
    assert layer._codebook.embed.grad.abs().sum() > 0
    close(layer._codebook.embed.grad, cbs.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["plain", "separate", "cosine"])
def test_forward_with_given_indices_returns_cross_entropy(name, train):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name])).train(train)
    x = randn(2, 8, layer.dim, seed=44)
    shape = (2, 8) if layer.heads == 1 else (2, 8, layer.heads)
    given = torch.randint(0, 12, shape, generator=torch.Generator().manual_seed(45))
    given.view(-1)[::5] = -1  # ignored
    cbs = head_codebooks(layer).clone()
    result = layer(x, indices=given)
    assert isinstance(result, tuple) and len(result) == 2
    quantized, ce = result
    assert quantized.shape == x.shape and ce.dtype == torch.float32
    g = as_bnh(layer, given, 2).reshape(-1, layer.heads)
    logp = logits64(z64(layer, x).reshape(-1, layer.heads, layer.codebook_dim), cbs,
                    layer.use_cosine_sim).log_softmax(-1)
    valid = g >= 0
    picked = logp.gather(-1, g.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(ce, -(picked[valid]).mean())


# ------------------------------------------------------------------------------------------
# gradients: rotation trick, straight-through, stochastic sampling




@pytest.mark.parametrize("heads", [1, 2])
def test_rotation_trick_input_gradient(heads):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, heads=heads, codebook_dim=6 // heads)
    assert layer.rotation_trick  # on by default
    spread_codebook(layer).train()
    x = randn(2, 10, 6, seed=46).requires_grad_(True)
    cbs = head_codebooks(layer).clone()
    out, indices, _ = layer(x)
    g = randn(2, 10, 6, seed=47)
    (grad,) = torch.autograd.grad(out, x, g)
    d = 6 // heads
    z = x.detach().to(F64).reshape(-1, d)
    q = codes_at(cbs, as_bnh(layer, indices, 2)).reshape(-1, d)
    ref = rotation_vjp64(z, q, g.to(F64).reshape(-1, d)).reshape(2, 10, 6)
    close(grad, ref, rtol=1e-5, atol=1e-5)
    assert (grad - g).abs().max() > 1e-2  # not plain straight-through


def test_plain_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(dim=6, codebook_size=12, rotation_trick=False)).train()
    x = randn(2, 10, 6, seed=48).requires_grad_(True)
    g = randn(2, 10, 6, seed=49)
    (grad,) = torch.autograd.grad(layer(x)[0], x, g)
    assert torch.equal(grad, g)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gumbel_straight_through_gradient(temperature):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, straight_through=True, stochastic_sample_codes=True,
                           sample_codebook_temp=temperature)
    assert not layer.rotation_trick
    spread_codebook(layer).train()
    cb = layer.codebook.detach().to(F64).clone()
    x = randn(2, 10, 6, seed=50).requires_grad_(True)
    g = randn(2, 10, 6, seed=51)
    out, _, _ = layer(x)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.isfinite(grad).all()
    assert (grad - g).abs().max() > 1e-3  # differs from plain straight-through
    # the gradient of the expected code softmax(-||x - c|| / t) @ C (Gumbel-softmax estimator)
    x64 = x.detach().to(F64).requires_grad_(True)
    probs = (-(x64.unsqueeze(-2) - cb).square().sum(-1).sqrt() / temperature).softmax(-1)
    (ref,) = torch.autograd.grad(probs @ cb, x64, g.to(F64))
    close(grad, ref, rtol=1e-4, atol=1e-5)


def test_stochastic_sampling_in_training_only_and_reproducible():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=1.0,
                           freeze_codebook=True)
    spread_codebook(layer)
    x = randn(4, 50, 4, seed=52)
    cb = layer.codebook.detach().clone()
    _, eval_idx, _ = layer.eval()(x)
    _, eval_idx2, _ = layer(x)
    assert torch.equal(eval_idx, eval_idx2)
    idx, clear = check_indices(layer, x, eval_idx, cb)
    layer.train()
    torch.manual_seed(7)
    _, a, _ = layer(x)
    torch.manual_seed(7)
    _, b, _ = layer(x)
    torch.manual_seed(8)
    _, c, _ = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != idx[..., 0]).float().mean() > 0.05  # sampled, not the argmin
    # a zero temperature is the argmin again
    _, d, _ = layer(x, sample_codebook_temp=0.0)
    assert torch.equal(d[clear], idx[..., 0][clear])


# ------------------------------------------------------------------------------------------
# validation


def test_bad_inputs_raise_naming_the_argument():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8).train()
    x = randn(2, 5, 6, seed=53)
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        layer(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="lens"):
        layer(x, mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.tensor([5, 5]))
    with pytest.raises((ValueError, TypeError), match="lens"):
        layer(x, lens=torch.tensor([5.0, 5.0]))
    with pytest.raises((ValueError, TypeError), match="indices"):
        layer.get_output_from_indices(torch.tensor([[0, 8]]))
    with pytest.raises((ValueError, TypeError), match="indices"):
        layer.get_output_from_indices(torch.tensor([[0, -2]]))
    with pytest.raises(TypeError, match="indices"):
        layer.get_output_from_indices(torch.tensor([[0.0, 1.0]]))
    image = VectorQuantize(dim=6, codebook_size=8, accept_image_fmap=True)
    with pytest.raises(ValueError, match="input"):
        image(randn(2, 6, 5))
    with pytest.raises(ValueError, match="input"):
        VectorQuantize(dim=6, codebook_size=8, accept_3d_fmap=True)(randn(2, 6, 3, 4))


@pytest.mark.parametrize("kmeans_init", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_input_raises_before_any_buffer_changes(bad, kmeans_init):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8, codebook_dim=4, kmeans_init=kmeans_init,
                           threshold_ema_dead_code=1.0).train()
    x = randn(2, 5, 6, seed=54)
    x[1, 3, 2] = bad
    before = buffers(layer)
    with pytest.raises(ValueError, match="input"):
        layer(x)
    assert_buffers_equal(before, layer)


@pytest.mark.parametrize("kwargs,name", [
    (dict(codebook_size=0), "codebook_size"),
    (dict(codebook_size=-3), "codebook_size"),
    (dict(codebook_size=2.5), "codebook_size"),
    (dict(codebook_size="8"), "codebook_size"),
    (dict(heads=0), "heads"),
    (dict(decay=1.5), "decay"),
    (dict(decay=-0.1), "decay"),
    (dict(codebook_dim=0), "codebook_dim"),
    (dict(rotation_trick=True, straight_through=True), "rotation_trick"),
    (dict(ema_update=True, learnable_codebook=True), "ema_update"),
    (dict(accept_image_fmap=True, accept_3d_fmap=True), "accept_"),
    (dict(commitment_weight=-1.0), "commitment_weight"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    kw = dict(dim=6, codebook_size=8)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=name):
        VectorQuantize(**kw)


# ------------------------------------------------------------------------------------------
# learnable codebook


def test_learnable_codebook_gets_the_commitment_gradient():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, ema_update=False).train()
    assert isinstance(layer._codebook.embed, torch.nn.Parameter)
    spread_codebook(layer)
    x = randn(2, 8, 6, seed=55)
    before = buffers(layer)
    cb = layer.codebook.detach().to(F64).clone()
    _, indices, loss = layer(x)
    loss.backward()
    grad = layer._codebook.embed.grad[0]
    # d/dC mean((z - C[idx])^2) = -2 sum_{rows choosing k} (z - c_k) / (N d)
    z = x.to(F64).reshape(-1, 6)
    idx = indices.reshape(-1)
    ref = torch.zeros_like(cb)
    ref.index_add_(0, idx, -2 * (z - cb[idx]) / z.numel())
    close(grad, ref, rtol=1e-5, atol=1e-7)
    # no EMA: the statistics and the codes as they were
    assert_buffers_equal(before, layer)


def test_learnable_codebook_in_bf16():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, codebook_dim=4, learnable_codebook=True,
                           ema_update=False).bfloat16().train()
    assert layer._codebook.embed.dtype == torch.bfloat16
    assert layer._codebook.cluster_size.dtype == torch.float32
    x = randn(2, 8, 6, seed=56).bfloat16().requires_grad_(True)
    out, _, loss = layer(x)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (out.float().square().mean() + loss).backward()
    grad = layer._codebook.embed.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------
# torch.compile: the training step (forward, backward, buffer updates) equals eager's


def train_steps(layer, batches, masks, autocast=False):
    """One forward + backward per batch -> per step (out, indices, loss, x.grad, param grads)."""
    module = getattr(layer, "_orig_mod", layer)  # parameter names without the compile wrapper
    steps = []
    for step, (x, mask) in enumerate(zip(batches, masks)):
        torch.manual_seed(step)  # random draws (k-means, dead codes) alike in both runs
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, indices, loss = layer(x, mask=mask)
        (out.float().square().mean() + loss.sum()).backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        module.zero_grad()
        steps.append((out.detach(), indices, loss.detach(), x.grad, grads))
    return steps


def assert_compiled_matches_eager(layer, shape, steps=3, mask=False, autocast=False, fullgraph=True):
    """`steps` training steps of `layer` compiled against an eager twin; then a non-finite batch
    must raise in the compiled graph before any buffer changed (NaN in padding is fine)."""
    torch._dynamo.reset()
    eager = copy.deepcopy(layer.train())
    compiled = torch.compile(layer, fullgraph=fullgraph, backend="aot_eager")
    batches = [randn(*shape, seed=60 + s) for s in range(steps)]
    masks = [randn(*shape[:2], seed=70 + s) > -0.5 if mask else None for s in range(steps)]
    got, want = train_steps(compiled, batches, masks, autocast), train_steps(eager, batches, masks, autocast)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g[1], w[1]), f"indices differ at step {step}"
        torch.testing.assert_close(g[:1] + g[2:4], w[:1] + w[2:4], msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(g[4], w[4], msg=lambda m: f"parameter gradients, step {step}: {m}")
    torch.testing.assert_close(layer.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)

    before = buffers(layer)
    x = batches[0].clone()
    x[0, 0, 0] = float("nan")
    keep = torch.ones(shape[:2], dtype=torch.bool) if mask else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the graph compiled above
        # an assert inside the graph (no host sync): RuntimeError, with the eager message
        with pytest.raises(RuntimeError, match="non-finite values"):
            compiled(x.requires_grad_(True), mask=keep)
        assert_buffers_equal(before, layer)
        if mask:
            keep[0, 0] = False
            compiled(x, mask=keep)  # NaN in padding never enters
            assert all(torch.isfinite(buf).all() for buf in layer.buffers() if buf.is_floating_point())
    return eager


@pytest.mark.parametrize("kwargs,mask,autocast", [
    (dict(), False, False),
    (dict(heads=2, codebook_dim=4, separate_codebook_per_head=True), True, False),
    (dict(heads=2, codebook_dim=4, use_cosine_sim=True), False, False),
    (dict(learnable_codebook=True, ema_update=False, commitment_weight=0.5,
          codebook_diversity_loss_weight=0.2), True, False),
    (dict(codebook_dim=4), False, True),
], ids=["default", "separate_heads_mask", "shared_heads_cosine", "learnable_losses", "bf16_autocast"])
def test_compile_fullgraph_training_matches_eager(kwargs, mask, autocast):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=8, codebook_size=16, **kwargs)
    assert_compiled_matches_eager(layer, (2, 12, 8), mask=mask, autocast=autocast)


def test_compile_kmeans_init_and_dead_codes_match_eager():
    """Both trace into one graph (fullgraph=True): k-means runs as a run-time op on the first
    batch, dead-code replacement is branch-free; the steps equal eager's."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2.0)
    eager = assert_compiled_matches_eager(layer, (2, 12, 4), steps=2, mask=True)
    assert bool(eager._codebook.initted) and int(eager._codebook.dead_codes_replaced) > 0


# ------------------------------------------------------------------------------------------
# distributed (2-process gloo)


WORLD = 2


def _rank_batch(step, rank, dim):
    return randn(2, 6, dim, seed=1000 + 10 * step + rank)


def _gathered_equal(t):
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _dist_worker(rank, world):
    # 1. EMA: identical on every rank, equal to one process on the concatenated batches
    for kwargs in (dict(dim=6, codebook_size=12),
                   dict(dim=7, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=True)):
        torch.manual_seed(0)
        layer = VectorQuantize(**kwargs).train()
        single = VectorQuantize(**kwargs, sync_codebook=False).train()
        single.load_state_dict(layer.state_dict())
        for step in range(3):
            xs = [_rank_batch(step, r, kwargs["dim"]) for r in range(world)]
            layer(xs[rank])
            single(torch.cat(xs))
        for key, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{key} differs across ranks"
            torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer._codebook.embed_avg, VectorQuantize(**kwargs)._codebook.embed_avg)
    # 2. k-means init and dead-code replacement: identical on every rank
    torch.manual_seed(rank)  # different local random state on purpose
    layer = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=4,
                           threshold_ema_dead_code=2.0).train()
    replaced = 0
    for step in range(3):
        x = _rank_batch(step, rank, 4) * (1 + rank)  # ranks see different data
        layer(x)
        replaced += int(layer._codebook.dead_codes_replaced)
        for key, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{key} differs across ranks after step {step}"
    assert bool(layer._codebook.initted)
    assert replaced > 0  # the replacement path ran


@pytest.mark.timeout(180)
def test_distributed_ema_kmeans_and_dead_codes():
    run_in_processes(_dist_worker, WORLD, timeout=150)
