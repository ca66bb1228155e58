"""LFQ's fp64 reference (see tests/test_lfq.py's docstring), shared by the LFQ test files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference import linear64

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

F64 = torch.float64

# ------------------------------------------------------------------------------------------
# fp64 reference


def all_codes(d, v):
    """(2^d, d) fp64 codes of every index, most significant bit first."""
    k = torch.arange(2**d)[:, None]
    bits = (k >> torch.arange(d - 1, -1, -1)) & 1
    return torch.where(bits.bool(), v, -v).to(F64)


def entropies(z, T, v):
    """Brute force: z (N, c, d) fp64 -> (per-sample entropy, batch entropy), fp64 scalars."""
    d = z.shape[-1]
    logits = 2 * T * z @ all_codes(d, v).t()  # (N, c, 2^d)
    p = logits.softmax(-1)
    if z.shape[0] == 0:
        return z.new_zeros(()), z.new_zeros(())
    per_sample = -torch.special.xlogy(p, p).sum(-1).mean()
    avg = p.mean(0)  # (c, 2^d)
    batch = -torch.special.xlogy(avg, avg).sum(-1).mean()
    return per_sample, batch


def pre_quant(layer, x_tokens):
    """x (b, n, dim) -> z (b, n, c, d) fp64 as the quantizer sees it, and the sign margin |z| min."""
    z = linear64(layer.project_in, x_tokens) if layer.has_projections else x_tokens.to(F64)
    if layer.soft_clamp_input_value is not None:
        c = layer.soft_clamp_input_value
        z = torch.tanh(z / c) * c
    z = z.reshape(*z.shape[:-1], layer.num_codebooks, layer.codebook_dim)
    if layer.orthogonal_rotation:
        z = z @ layer.orthogonal_rot.to(F64)
    margin = z.abs().amin((-2, -1))
    if layer.spherical:
        z = z / z.norm(dim=-1, keepdim=True) * layer.codebook_scale
    return z, margin


def code_value(layer):
    v = layer.codebook_scale
    return v / math.sqrt(layer.codebook_dim) if layer.spherical else v


def reference(layer, x_tokens, T=100.0, mask=None):
    """Everything LFQ computes on tokens (b, n, dim), in fp64."""
    z, margin = pre_quant(layer, x_tokens)
    d = layer.codebook_dim
    bits = z > 0
    weights = 2 ** torch.arange(d - 1, -1, -1)
    indices = (bits.long() * weights).sum(-1)  # (b, n, c)
    v = code_value(layer)
    codes = torch.where(bits, v, -v).to(F64)
    rotated = codes @ layer.orthogonal_rot.to(F64).t() if layer.orthogonal_rotation else codes
    quantized = rotated.reshape(*rotated.shape[:-2], -1)
    out = linear64(layer.project_out, quantized) if layer.has_projections else quantized
    kept_z = z[mask] if mask is not None else z.reshape(-1, *z.shape[-2:])
    kept_codes = codes[mask] if mask is not None else codes.reshape(-1, *codes.shape[-2:])
    per_sample, batch = entropies(kept_z, T, v)
    commitment = (kept_z - kept_codes).square().mean() if kept_z.numel() else z.new_zeros(())
    entropy_loss = per_sample - layer.diversity_gamma * batch
    if layer.experimental_softplus_entropy_loss:
        entropy_loss = F.softplus(entropy_loss + layer.entropy_loss_offset)
    aux = entropy_loss * layer.entropy_loss_weight + commitment * layer.commitment_loss_weight
    if not layer.keep_num_codebooks_dim:
        indices = indices.squeeze(-1)
    return dict(z=z, margin=margin, indices=indices, out=out, per_sample=per_sample, batch=batch,
                commitment=commitment, aux=aux)


# ------------------------------------------------------------------------------------------
