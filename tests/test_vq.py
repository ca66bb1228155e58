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

from dtype_matrix import DTYPES, dtype_matrix, run_cell
from reference import close, randn
from vq_layers import VectorQuantize
from vq_reference import (
    F64,
    as_bnh,
    assert_buffers_equal,
    brute,
    buffers,
    check_indices,
    check_training_step,
    codes_at,
    head_codebooks,
    smoothed64,
    spread_codebook,
    tokens_of,
    z64,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


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
    "heads_separate": (dict(dim=6, codebook_size=16, heads=2, codebook_dim=3, separate_codebook_per_head=True),
                       (2, 9, 6)),
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
