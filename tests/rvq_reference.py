"""ResidualVQ's fp64 reference, shared by the ResidualVQ test files."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from reference import assert_buffers_equal, buffer_state, linear64, randn  # noqa: F401 (re-exported)

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# fp64 reference


def nearest64(r, codebook):
    """r (..., d), codebook (K, d), both fp64 -> brute-force argmin (...), near-tie flag (...)."""
    d2 = (r.unsqueeze(-2) - codebook).square().sum(-1)
    two = d2.topk(2, dim=-1, largest=False).values
    scale = r.square().sum(-1) + codebook.square().sum(-1).max()
    return d2.argmin(-1), (two[..., 1] - two[..., 0]) <= 1e-5 * scale


def books64(rvq):
    return [layer.codebook.detach().to(F64).clone() for layer in rvq.layers]


def project_in64(rvq, tokens):
    return linear64(rvq.project_in, tokens) if rvq.has_projections else tokens.detach().to(F64)


def project_out64(rvq, v):
    return linear64(rvq.project_out, v) if rvq.has_projections else v


def reference(z, books, kept=None):
    """fp64 residual VQ of projected tokens z (..., d) with codebooks books[k] (K, d); stages
    >= kept are dropped (index -1, zero code)."""
    z = z.detach().to(F64)
    kept = len(books) if kept is None else kept
    residual, out = z, torch.zeros_like(z)
    codes, indices, residuals = [], [], []
    near_tie = torch.zeros(z.shape[:-1], dtype=torch.bool)
    for k, codebook in enumerate(books):
        if k >= kept:
            codes.append(torch.zeros_like(z))
            indices.append(torch.full(z.shape[:-1], -1, dtype=torch.long))
            continue
        residuals.append(residual)
        idx, tie = nearest64(residual, codebook)
        near_tie |= tie
        code = codebook[idx]
        residual, out = residual - code, out + code
        codes.append(code)
        indices.append(idx)
    return SimpleNamespace(z=z, out=out, codes=torch.stack(codes), indices=torch.stack(indices, dim=-1),
                           near_tie=near_tie, residuals=residuals)


def reference_layer(rvq, tokens, books=None, kept=None):
    """Reference of a ResidualVQ on tokens (..., dim): its projections in fp64, its codebooks
    (or the given ones, e.g. a copy saved before a training step)."""
    ref = reference(project_in64(rvq, tokens), books64(rvq) if books is None else books, kept)
    ref.projected_out = project_out64(rvq, ref.out)
    return ref


def assert_indices_match(indices, ref, min_fraction=0.5):
    ok = ~ref.near_tie
    assert ok.float().mean() >= min_fraction, "too many near-ties for a meaningful check"
    assert indices.dtype == torch.long
    bad = (indices[ok] != ref.indices[ok]).any(-1)
    assert not bad.any(), f"{int(bad.sum())} tokens differ from the fp64 reference"
    return ok


def assert_stagewise_argmin(indices, z, books):
    """The residual property on the layer's own choices: stage k's index is the fp64 argmin of
    z minus the codes the layer chose in stages < k (except near-ties); -1 stages add nothing."""
    residual = z.detach().to(F64)
    checked = 0
    for k, codebook in enumerate(books):
        idx = indices[..., k]
        used = idx >= 0
        ref, tie = nearest64(residual, codebook)
        good = used & ~tie
        assert torch.equal(idx[good], ref[good]), f"stage {k}: not the argmin of the residual"
        checked += int(good.sum())
        residual = residual - torch.where(used.unsqueeze(-1), codebook[idx.clamp(min=0)], 0.0)
    return checked


def ema64(cluster_size, embed_avg, vectors, indices, decay, eps):
    """One EMA step, fp64 with one-hot matrices: -> cluster_size (K,), embed_avg (K, d), embed (K, d)."""
    k = cluster_size.shape[-1]
    onehot = F.one_hot(indices, k).to(F64)  # (N, K)
    counts, sums = onehot.sum(0), onehot.t() @ vectors.to(F64)
    cs = decay * cluster_size.to(F64) + (1 - decay) * counts
    ea = decay * embed_avg.to(F64) + (1 - decay) * sums
    total = cs.sum()
    smoothed = (cs + eps) / (total + k * eps) * total
    return cs, ea, ea / smoothed.unsqueeze(-1)


def teacher_forced_ce64(z, books, given, keep=None):
    """Sum over stages of the mean (over kept tokens) cross-entropy of softmax(-||r_k - c||) to the
    given code, r_k = z - (the given codes of stages < k). z (..., d) fp64 (may require grad)."""
    residual, total = z, z.new_zeros(())
    for k, codebook in enumerate(books):
        g = given[..., k]
        logits = -(residual.unsqueeze(-2) - codebook).square().sum(-1).sqrt()
        nll = -logits.log_softmax(-1).gather(-1, g.unsqueeze(-1)).squeeze(-1)
        total = total + (nll.mean() if keep is None else nll[keep].mean())
        residual = residual - codebook[g]
    return total


def set_codebooks(rvq, seed, scale=1.0, ratio=0.5):
    """Codebooks at a geometric series of scales, as a trained residual quantizer has them."""
    layers = rvq.layers[:1] if rvq.shared_codebook else rvq.layers
    for k, layer in enumerate(layers):
        layer.codebook = randn(*layer.codebook.shape, seed=seed + k, scale=scale * ratio**k)
    return rvq


codebook_state = buffer_state  # (the name the residual tests use)


def seeded_training_steps(layer, x, seeds):
    """A quantize-dropout layer's training steps on x, one per seed drawn with torch.manual_seed:
    yields (seed, a copy of the layer from before the step, the step's result)."""
    for seed in seeds:
        before = copy.deepcopy(layer)
        torch.manual_seed(seed)
        yield seed, before, layer(x)
