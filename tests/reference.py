"""Small helpers the layer tests share for their independent references."""

from __future__ import annotations

import math
from collections import Counter

import torch

F64 = torch.float64


def close(actual, expected, *, rtol=1e-5, atol=1e-6, msg=None):
    """torch.testing.assert_close with both sides in fp64 (their dtypes need not match; the
    tolerances apply to the values), by default at the fp32-accuracy tolerances most checks use.
    rtol=0, atol=0 asks for equal values."""
    torch.testing.assert_close(actual.detach().to(F64), expected.detach().to(F64), rtol=rtol, atol=atol, msg=msg)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def linear64(linear, x):
    """An nn.Linear applied in fp64 with its own weights."""
    out = x.to(F64) @ linear.weight.detach().to(F64).t()
    return out + linear.bias.detach().to(F64) if linear.bias is not None else out


def brute_force_usage(stage_indices, codebook_size):
    """(perplexity, fraction used, codes used) by counting, ignoring negative (dropped) indices."""
    values = [v for v in stage_indices.flatten().tolist() if v >= 0]
    counts = Counter(values)
    n = len(values)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0
    return math.exp(entropy), len(counts) / codebook_size, len(counts)


def call_structure(result):
    """Tuple length, shapes and float/integer kind (indices are int64 here by design, int32 in the peer)."""
    assert isinstance(result, tuple)
    return [(tuple(t.shape), t.dtype if t.is_floating_point() else "integer") for t in result]


def rotation_vjp64(x, q, g):
    """The rotation trick's input gradient (arXiv 2410.06424), per row, in fp64: lambda R^T g with
    R = I - 2 w w^T + 2 q^ u^T built as an explicit d x d matrix (u = x^, w = (u + q^)^)."""
    x, q, g = x.to(torch.float64), q.to(torch.float64), g.to(torch.float64)
    out = torch.empty_like(x)
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    for i in range(x.shape[0]):
        u, qh = x[i] / x[i].norm(), q[i] / q[i].norm()
        w = (u + qh) / (u + qh).norm()
        rotation = eye - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
        # a rotation taking u to q^
        assert torch.allclose(rotation @ u, qh, atol=1e-10)
        assert torch.allclose(rotation.t() @ rotation, eye, atol=1e-10)
        out[i] = q[i].norm() / x[i].norm() * (rotation.t() @ g[i])
    return out


def buffer_state(module) -> dict:
    """A copy of every buffer (statistics, codes, flags), by name."""
    return {name: buf.detach().clone() for name, buf in module.named_buffers()}


def assert_buffers_equal(module, saved: dict) -> None:
    """Every buffer as `buffer_state` saved it, bit for bit."""
    for name, buf in module.named_buffers():
        assert torch.equal(buf, saved[name]), f"buffer {name} changed"


def assert_stage_usage(layer, indices) -> None:
    """A residual layer's code_usage of indices (..., q), per stage, against brute_force_usage."""
    q = indices.shape[-1]
    usage = layer.code_usage(indices)
    for field in usage:
        assert field.shape == (q,)
    for k in range(q):
        ppl, frac, used = brute_force_usage(indices[..., k], layer.codebook_size)
        assert math.isclose(float(usage.perplexity[k]), ppl, rel_tol=1e-5)
        assert math.isclose(float(usage.usage[k]), frac, rel_tol=1e-6)
        assert int(usage.codes_used[k]) == used
