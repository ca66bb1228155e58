"""fp64 references for VectorQuantize, written from the description of the scheme (tests/test_vq.py's
docstring lists them); shared by the VectorQuantize test modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import close, linear64, randn

F64 = torch.float64
NEAR_TIE = 1e-5


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
