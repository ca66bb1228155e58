"""ResidualVQ's and VectorQuantize's input gradients (rotation trick, straight-through, with the
commitment loss) against a plain, unfused fp64 autograd reference of the residual chain: the
layers form the output and the commitment error in one autograd Function that recomputes the
codes and the rotation in its backward (layers/vq_fused.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vq_layers import ResidualVQ, VectorQuantize

F64 = torch.float64


def rotated64(s, q):
    """The rotation trick as the paper writes it, by autograd: lambda R s with R and lambda
    constants (u, q^, w from s and q), in value ~q."""
    with torch.no_grad():
        s_norm, q_norm = s.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
        u, q_dir = s / s_norm, q / q_norm
        w = F.normalize(u + q_dir, dim=-1)
    return q_norm / s_norm * (s - 2 * (s * w).sum(-1, keepdim=True) * w + 2 * (s * u).sum(-1, keepdim=True) * q_dir)


def reference_grad(x, target, books, indices, keep, rotation, cosine, commitment_weight):
    """d/dx of (out * target).sum() + weight * sum of the stages' commitment losses, in fp64:
    stage k searched the residual r_k (padding zeroed, normalized when cosine) and chose
    books[k][indices[..., k]]; the next residual is r_k minus the code (detached)."""
    x = x.detach().to(F64).requires_grad_()
    keep = torch.ones(x.shape[:-1], dtype=torch.bool) if keep is None else keep
    residual, out, loss = x, torch.zeros_like(x), x.new_zeros(())
    for k, book in enumerate(books):
        search = torch.where(keep.unsqueeze(-1), residual, 0.0)
        search = F.normalize(search, dim=-1) if cosine else search
        q = book[indices[..., k].clamp(min=0)]
        stage = rotated64(search, q) if rotation else search + (q - search).detach()
        stage = torch.where(keep.unsqueeze(-1), stage, 0.0)
        error = torch.where(keep.unsqueeze(-1), (search - q).square(), 0.0)
        loss = loss + commitment_weight * error.sum() / (keep.sum() * x.shape[-1])
        out = out + stage
        residual = residual - stage.detach()
    ((out * target.to(F64)).sum() + loss).backward()
    return x.grad


@pytest.mark.parametrize("kwargs, masked", [
    ({}, False),
    ({}, True),
    (dict(rotation_trick=False), True),
    (dict(straight_through=True, sample_codebook_temp=0.0), False),
    (dict(shared_codebook=True, commitment_weight=0.5), True),
    (dict(use_cosine_sim=True), False),
], ids=["rotation", "rotation_mask", "straight_through_mask", "gumbel_at_zero", "shared_mask", "cosine"])
def test_residual_input_gradient_equals_unfused_fp64(kwargs, masked):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=12, num_quantizers=4, codebook_size=16, **kwargs).train()
    books = [layer.codebook.detach().to(F64).clone() for layer in rvq.layers]
    x = (torch.randn(3, 40, 12) * 2).requires_grad_()
    target = torch.randn(3, 40, 12)
    keep = torch.rand(3, 40) > 0.3 if masked else None
    out, indices, losses = rvq(x, mask=keep)
    ((out * target).sum() + losses.sum()).backward()
    want = reference_grad(x, target, books, indices, keep, rvq.layers[0].rotation_trick, rvq.layers[0].use_cosine_sim,
                          rvq.layers[0].commitment_weight)
    torch.testing.assert_close(x.grad.to(F64), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("kwargs", [{}, dict(heads=2, separate_codebook_per_head=True),
                                    dict(straight_through=True, sample_codebook_temp=0.0)],
                         ids=["rotation", "separate_heads", "straight_through"])
def test_vq_input_gradient_equals_unfused_fp64(kwargs):
    torch.manual_seed(1)
    heads = kwargs.get("heads", 1)
    vq = VectorQuantize(dim=8 * heads, codebook_size=16, codebook_dim=8, **kwargs).train()
    books = vq.codebook.detach().to(F64).clone().reshape(-1, 16, 8)
    x = (torch.randn(2, 30, 8 * heads) * 2).requires_grad_()
    target = torch.randn(2, 30, 8 * heads)
    out, indices, loss = vq(x)
    ((out * target).sum() + loss).backward()
    indices = indices.reshape(2, 30, heads)
    parts = []
    for h in range(heads):  # each head against its codebook; the commitment is the mean over all heads
        cols = slice(8 * h, 8 * h + 8)
        book = books[h if books.shape[0] > 1 else 0]
        part = reference_grad(x[..., cols], target[..., cols], [book], indices[..., h : h + 1], None,
                              vq.rotation_trick, False, vq.commitment_weight / heads)
        parts.append(part)
    want = torch.cat(parts, dim=-1)
    torch.testing.assert_close(x.grad.to(F64), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
