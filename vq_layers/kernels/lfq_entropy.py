"""LFQ's code mass and bit entropies, exact, in O(N·d + 2^d) memory (pure-torch reference).

Pure ops on one process's tokens: the entropies these add up to, over the global batch, are
composed in lfq_entropy_loss.py (above this floor), which also sums them over the ranks.

For a token with bit logits l (d,), LFQ's softmax over the 2^d corners factorizes into d
independent bits, p(bit_i = 1) = sigmoid(l_i), so

    log p(k | token) = sum_i [b_ki logsigmoid(l_i) + (1 - b_ki) logsigmoid(-l_i)]

(b_ki: bit i of code k, most significant first, as LFQ's indices). Then

- `binary_entropy`: a token's entropy over the 2^d codes is sum_i binary_entropy(l_i), O(N·d);
- `code_mass`: sum_n p(k | n) over the tokens, per code (the batch's code distribution, once
  divided by the count), via one of two exact algorithms per token:
  * sparse-exact: bits with |l_i| >= CONFIDENT_LOGIT are fixed at their likely value; the token's
    mass on the 2^u corners of its u uncertain bits, and on those corners with one fixed bit
    flipped (tiny, but they carry the fixed bits' gradient), is enumerated and scatter-added;
  * dense: p(k | n) factorizes over the high and low halves of the bits, so the mass over all
    2^d codes is one matmul of two (n, 2^(d/2)) factors, computed in token chunks whose backward
    recomputes them; for tokens with many uncertain bits.

Both write log-probabilities as [logsigmoid(l) | logsigmoid(-l)] @ [b | 1 - b]^T: a sum of
non-positive terms with 0/1 weights, free of the cancellation that l·b - sum softplus(l) has.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import self_check
from .backend import run, sync_free

# sigmoid(-30) = 9.4e-14: a bit with |l| >= 30 puts at most that fraction of the token's mass on
# its unlikely side. Fixing all such bits (d <= 64 of them) drops at most 64 * 9.4e-14 = 6e-12 of
# the mass, far below fp32 resolution (6e-8), and their gradient factor sigmoid(-|l|) likewise.
CONFIDENT_LOGIT = 30.0
# sparse-exact for tokens with u uncertain bits when 2^u <= 2^d / 8 and u <= 12: beyond that the
# enumeration (gather/scatter) is no cheaper than the dense matmul over all 2^d codes
MAX_SPARSE_BITS = 12
SPARSE_CODES_FRACTION_LOG2 = 3
# on the CPU, every token takes the dense path up to this many (token, codebook, code) triples:
# there it is faster at any temperature (2 cores; beyond, at inv_temperature 100, its exp gives
# subnormal probabilities, which slow the CPU's matmul 4-5x, and the sparse path wins)
CPU_DENSE_MAX_PAIRS = 2**21
# at most this many (token, code) pairs exist at once: 16 MiB of fp32 per tile
TILE_ELEMENTS = 2**22
# exp and softplus of an argument below -87 (a result below 1.6e-38, near the smallest normal
# fp32 number, 1.18e-38: subnormal or zero) take a slow path on the CPU, ~50x slower. The dense
# path keeps their arguments at or above it and sets what lies below to zero: only the
# subnormal band of probabilities (below 1.7e-38) changes, to 0.
EXP_FLOOR = -87.0
P_FLOOR = 1.7e-38


def code_bits(start: int, stop: int, d: int, device) -> Tensor:
    """Bits (stop - start, d) of codes start..stop-1, most significant bit first, fp32."""
    shifts = torch.arange(d - 1, -1, -1, device=device)
    codes = torch.arange(start, stop, device=device)
    return ((codes[:, None] >> shifts) & 1).to(torch.float32)


def logsigmoid(x: Tensor) -> Tensor:
    # -softplus(-x): the same values as F.logsigmoid, without its CPU kernel's extra buffer
    return -F.softplus(-x)


def _bit_logprobs(logits: Tensor) -> Tensor:
    """[logsigmoid(l) | logsigmoid(-l)] (..., 2d): the two sides of every bit."""
    return torch.cat([logsigmoid(logits), logsigmoid(-logits)], dim=-1)


def _both_sides(bits: Tensor) -> Tensor:
    return torch.cat([bits, 1 - bits], dim=-1)


def _grad_from_bit_sums(logits: Tensor, set_sum: Tensor, clear_sum: Tensor) -> Tensor:
    """d/dlogits of sum_k w_nk where w_nk = p(k | n) c_nk (c held fixed), from the sums of w over
    the codes with each bit set and clear.

    dp(k | n)/dl_i = p(k | n) (b_ki - sigmoid(l_i)); written as
    sigmoid(-l_i) sum_{b_ki=1} w_nk - sigmoid(l_i) sum_{b_ki=0} w_nk, two same-sign sums.
    """
    return torch.sigmoid(-logits) * set_sum - torch.sigmoid(logits) * clear_sum


def _bits_grad(logits: Tensor, weighted: Tensor) -> Tensor:
    """As `_grad_from_bit_sums`, for weights w (n, 2^h) over all corners of one block of h bits."""
    bits = code_bits(0, weighted.shape[-1], logits.shape[-1], logits.device)
    return _grad_from_bit_sums(logits, weighted @ bits, weighted @ (1 - bits))


@functools.lru_cache(maxsize=None)
def _half_tables(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """`_build_half_tables`, built once per (d, device) in eager calls (their construction was
    a good part of a small step's ops); traced afresh under torch.compile (constants there)."""
    if torch.compiler.is_compiling():
        return _build_half_tables(d, device)
    return _cached_half_tables(d, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_half_tables(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return _build_half_tables(d, device)


def _build_half_tables(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Constants of the dense path for d bits, split into high (d // 2) and low halves:

    - signs (2,) = [-1, 1]: l[..., None] * signs = [-l, l] per bit, interleaved (d, 2);
    - to_logp (2d, H + L), H = 2^high, L = 2^low: softplus([-l, l]) @ to_logp = the log-
      probabilities of the H corners of the high bits, then of the L corners of the low bits:
      -softplus(-l_i) = logsigmoid(l_i) where corner bit i is set, -softplus(l_i) where clear;
    - to_sums (H + L, 2d): w @ to_sums = [sum of w over the corners with bit i set, minus the
      sum over those with bit i clear] per bit (interleaved), for w over the H then L corners.
    """
    high = d // 2
    blocks = []
    for first, width in ((0, high), (high, d - high)):  # one block per half: its corners' bits
        bits = torch.zeros(2**width, d, 2)
        bits[:, first:first + width, 0] = code_bits(0, 2**width, width, "cpu")
        bits[:, first:first + width, 1] = 1 - bits[:, first:first + width, 0]
        blocks.append(bits.reshape(2**width, 2 * d))
    both = torch.cat(blocks)  # (H + L, 2d): 1 where the corner has that side of the bit
    signs = torch.tensor([-1.0, 1.0])
    return signs.to(device), (-both.T).contiguous().to(device), (both * -signs.repeat(d)).to(device)


def _half_probs(logits: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """p(corner | token) over the corners of each half of the bits: (n, c, d) -> (n, c, H + L)
    (0 for tokens with keep False), and [-l, l] (n, c, d, 2)."""
    signs, to_logp, _ = _half_tables(logits.shape[-1], logits.device)
    both = logits.unsqueeze(-1) * signs
    # sums of non-positive terms (no cancellation); softplus(x < -87) < 1.6e-38 adds nothing to them
    logp = F.softplus(both.clamp(min=EXP_FLOOR)).flatten(-2) @ to_logp
    probs = F.threshold(torch.exp(logp.clamp(min=EXP_FLOOR)), P_FLOOR, 0.0)
    return (probs if keep is None else torch.where(keep[:, None, None], probs, 0.0)), both


def _triton_dense_mass(logits: Tensor, grad_mass: Tensor | None, keep: Tensor | None = None) -> Tensor:
    """As `_dense_mass`, for one codebook's logits (n, d): the Triton kernels."""
    from . import triton_lfq_entropy
    pos, neg = logsigmoid(logits), logsigmoid(-logits)
    if keep is not None:  # a dropped token: every corner's log-probability ~ -d * 1e30, so p = 0
        pos, neg = (torch.where(keep[:, None], t, -1e30) for t in (pos, neg))
    if grad_mass is None:
        return triton_lfq_entropy.code_mass(pos, neg)
    return _grad_from_bit_sums(logits, *triton_lfq_entropy.bit_sums(pos, neg, grad_mass))


def _dense_mass(logits: Tensor, keep: Tensor | None = None, grad_mass: Tensor | None = None,
                torch_only: bool = False) -> Tensor:
    """Forward: sum over the kept tokens of p(k | n), (n, c, d) -> (c, 2^d). Backward
    (grad_mass (c, 2^d) given): d/dlogits (n, c, d), zero for the dropped tokens.

    p(k | n) factorizes over the high and low halves of the bits: p = A[n, k_high] B[n, k_low],
    so a codebook's mass is one matmul A^T B, (H, n) @ (n, L), with no (n, 2^d) tensor; all
    codebooks in one batched matmul. Tokens go in chunks of at most TILE_ELEMENTS / (c (H + L))
    (one chunk at tokenizer sizes); the backward recomputes A and B per chunk. Every token takes
    the same ops (no data-dependent branch: no host sync). The Triton kernels take it where they
    run, unless `torch_only` (torch ops, which autograd can differentiate: double backward).
    """
    if not torch_only:  # on the GPU: the whole (n, 2^d) matrix in registers, tile by tile
        def triton_fn():
            return torch.stack([_triton_dense_mass(logits[:, j], None if grad_mass is None else grad_mass[j], keep)
                                for j in range(logits.shape[1])], dim=0 if grad_mass is None else 1)
        return run(logits.device, None, triton_fn, lambda: _dense_mass(logits, keep, grad_mass, torch_only=True),
                   (self_check.lfq_key(logits), lambda: self_check.check_lfq_entropy(logits.device, logits.shape[-1])))
    n, c, d = logits.shape
    high, low = 2 ** (d // 2), 2 ** (d - d // 2)
    token_chunk = max(1, TILE_ELEMENTS // (c * (high + low)))
    if grad_mass is not None:
        grad_mass = grad_mass.reshape(c, high, low)
        _, _, to_sums = _half_tables(d, logits.device)
    mass, grads = None, []
    for t in range(0, n, token_chunk):
        rows = slice(t, t + token_chunk)
        probs, both = _half_probs(logits[rows], None if keep is None else keep[rows])
        a, b = probs[..., :high], probs[..., high:]  # (n, c, H), (n, c, L)
        if grad_mass is None:
            part = torch.einsum("nch,ncl->chl", a, b)
            mass = part if mass is None else mass.add_(part)
            continue
        # w = p(k | n) g_k summed over the other half's corners, per corner of each half
        weighted = probs * torch.cat([torch.einsum("ncl,chl->nch", b, grad_mass),
                                      torch.einsum("nch,chl->ncl", a, grad_mass)], dim=-1)
        sums = (weighted @ to_sums).unflatten(-1, (d, 2))  # [set sum, -clear sum] per bit
        # sigmoid(-l) * set sum - sigmoid(l) * clear sum
        grads.append((torch.sigmoid(both) * sums).sum(-1))
    if grad_mass is not None:
        return grads[0] if len(grads) == 1 else torch.cat(grads) if grads else torch.zeros_like(logits)
    return logits.new_zeros(c, high * low) if mass is None else mass.reshape(c, high * low)


def _sparse_mass(logits: Tensor, u: int, grad_mass: Tensor | None = None) -> Tensor:
    """As `_dense_mass`, for tokens with exactly u uncertain bits, over their 2^u corners."""
    n, d = logits.shape
    weights = 2 ** torch.arange(d - 1, -1, -1, device=logits.device)  # index value of each bit
    likely = (logits > 0).long()
    confident_lp = logsigmoid(logits.abs())
    selected = (-logits.abs()).topk(u, dim=-1).indices  # (n, u): the uncertain bits
    fixed_lp = confident_lp.scatter(1, selected, 0.0).sum(-1, keepdim=True)  # (n, 1)
    corners = code_bits(0, 2**u, u, logits.device)  # (2^u, u)
    sel_logits = logits.gather(1, selected)
    sel_weights = weights[selected]  # (n, u)
    base = (likely * weights).sum(-1) - (likely.gather(1, selected) * sel_weights).sum(-1)
    out = logits.new_zeros(n, d) if grad_mass is not None else logits.new_zeros(2**d)
    # Besides its 2^u corners c, each token puts p_c exp(-|l_i|) on c with fixed bit i flipped
    # (exactly: the ratio sigmoid(-|l|) / sigmoid(|l|)). Those single flips are tiny in value but
    # carry the fixed bits' gradient, so both passes visit them: (tokens, 2^u, d) per chunk.
    # Double flips (relative mass <= 1e-26) are left out.
    token_chunk = max(1, TILE_ELEMENTS // (2**u * d))
    for t in range(0, n, token_chunk):
        rows = slice(t, t + token_chunk)
        chunk = logits[rows]
        probs = torch.exp(fixed_lp[rows] + _bit_logprobs(sel_logits[rows]) @ _both_sides(corners).T)
        index = base[rows, None].expand(-1, 2**u).clone()  # (n, 2^u) code of every corner
        for j in range(u):
            index += corners[:, j].long() * sel_weights[rows, j : j + 1]
        flipped = index.unsqueeze(-1) ^ weights  # (n, 2^u, d)
        if grad_mass is None:
            ratio = torch.exp(-chunk.abs()).scatter(1, selected[rows], 0.0)  # enumerated bits: 0
            out.scatter_add_(0, index.reshape(-1), probs.reshape(-1))
            out.scatter_add_(0, flipped.reshape(-1), (probs.unsqueeze(-1) * ratio.unsqueeze(1)).reshape(-1))
            continue
        grad_here = grad_mass[index]  # (n, 2^u)
        # d/dl_i sum_k g_k p_k for a fixed bit i = sign(l_i) sigmoid(-|l_i|) sum_c p_c (g_c - g_{c xor i})
        moved = torch.einsum("nc,ncd->nd", probs, grad_here.unsqueeze(-1) - grad_mass[flipped])
        grad = torch.sign(chunk) * torch.sigmoid(-chunk.abs()) * moved
        out[rows] += grad.scatter(1, selected[rows], _bits_grad(sel_logits[rows], probs * grad_here))
    return out


def _partition(logits: Tensor, keep: Tensor | None = None) -> list[tuple[Tensor, int | None]]:
    """(token index, u or None for dense) groups of one codebook's tokens (n, d); tokens with
    `keep` (n,) False are in no group (they carry no mass and get a zero gradient).

    Data-dependent (host syncs): it lives inside the torch.library ops.
    """
    d = logits.shape[-1]
    uncertain = (logits.abs() < CONFIDENT_LOGIT).sum(-1)
    max_sparse = min(MAX_SPARSE_BITS, d - SPARSE_CODES_FRACTION_LOG2)
    kept = torch.ones_like(uncertain, dtype=torch.bool) if keep is None else keep
    dense = (uncertain > max_sparse) & kept
    sparse = kept & ~dense
    groups = [(dense.nonzero().squeeze(-1), None)] if dense.any() else []
    for u in torch.unique(uncertain[sparse]).tolist():
        groups.append((((uncertain == u) & sparse).nonzero().squeeze(-1), int(u)))
    return groups


def _mass(logits: Tensor, groups, grad_mass: Tensor | None = None, torch_only: bool = False) -> Tensor:
    """logits (n, d) -> code mass (2^d,) or, with grad_mass (2^d,), its gradient (n, d)."""
    if grad_mass is None:
        out = logits.new_zeros(2 ** logits.shape[-1])
    else:
        out = torch.zeros_like(logits)
    for tokens, u in groups:
        if u is None:  # one codebook's dense tokens
            part = _dense_mass(logits[tokens, None], None, None if grad_mass is None else grad_mass[None], torch_only)
            part = part[0] if grad_mass is None else part[:, 0]
        else:
            part = _sparse_mass(logits[tokens], u, grad_mass)
        if grad_mass is None:
            out += part
        else:
            out[tokens] = part
    return out


def _all_dense(logits: Tensor) -> bool:
    """Whether every token takes the dense path: always where ops must not sync (the sparse path's
    partition is data-dependent), and on the CPU for at most CPU_DENSE_MAX_PAIRS (token,
    codebook, code) triples, where it was measured faster than the sparse-exact enumeration at
    any temperature (docs/kernels.md). Static shapes only: no look at the data."""
    n, c, d = logits.shape
    return sync_free(logits.device) or n * c * 2**d <= CPU_DENSE_MAX_PAIRS


def _mass_per_codebook(logits: Tensor, keep: Tensor | None = None) -> Tensor:
    if _all_dense(logits):
        return _dense_mass(logits, keep)
    return torch.stack([_mass(logits[:, c], _partition(logits[:, c], keep)) for c in range(logits.shape[1])])


def _mass_gradient(logits: Tensor, mass: Tensor, grad_mass: Tensor, keep: Tensor | None = None,
                   torch_only: bool = False) -> Tensor:
    # every token's probabilities sum to 1, so a constant shift of grad_mass changes nothing;
    # centring it on its mass-weighted mean removes most cancellation from the sums below
    centre = (grad_mass * mass).sum(-1, keepdim=True) / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    grad_mass = grad_mass - centre
    if _all_dense(logits):
        return _dense_mass(logits, keep, grad_mass, torch_only)
    # the partition is recomputed (cheap: one pass over the logits) rather than carried from the forward
    return torch.stack([_mass(logits[:, c], _partition(logits[:, c], keep), grad_mass[c].contiguous(), torch_only)
                        for c in range(logits.shape[1])], dim=1)


def _backward(ctx, grad_mass):
    logits, mass, keep = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True): autograd records the torch formula
        return _mass_gradient(logits, mass, grad_mass, keep, torch_only=True), None
    if torch.compiler.is_compiling():
        return _code_mass_backward_op(logits, mass, grad_mass, keep), None
    return _mass_gradient(logits, mass, grad_mass, keep), None


class _CodeMass(torch.autograd.Function):
    """Eager: logits (n, c, d), keep (n,) or None -> (c, 2^d); the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, logits, keep):
        mass = _mass_per_codebook(logits, keep)
        ctx.save_for_backward(logits, mass, keep)
        return mass

    backward = staticmethod(_backward)


# Under torch.compile the code mass is one opaque torch.library op (its backward another): its
# partition of the tokens is data-dependent (host syncs), which fullgraph=True could not trace.
# Eager calls take the autograd.Function instead: the op's wrapper would import torch._dynamo
# in every process (see nearest_code.py).
_code_mass_op = torch.library.custom_op("vq_layers::code_mass", _mass_per_codebook, mutates_args=())
@_code_mass_op.register_fake
def _(logits, keep=None):
    return logits.new_empty(logits.shape[1], 2 ** logits.shape[2])


@torch.library.custom_op("vq_layers::code_mass_backward", mutates_args=())
def _code_mass_backward_op(logits: Tensor, mass: Tensor, grad_mass: Tensor, keep: Optional[Tensor]) -> Tensor:
    return _mass_gradient(logits, mass, grad_mass, keep)


@_code_mass_backward_op.register_fake
def _(logits, mass, grad_mass, keep):
    return torch.empty_like(logits)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output, inputs[1])


torch.library.register_autograd("vq_layers::code_mass", _backward, setup_context=_save_for_backward)


def code_mass(logits: Tensor, keep: Tensor | None = None) -> Tensor:
    """Sum over the kept tokens of each code's probability: logits (n, c, d) fp32, keep (n,) bool
    or None (all) -> (c, 2^d) fp32; the backward recomputes the probabilities and gives the
    dropped tokens a zero gradient."""
    return _code_mass_op(logits, keep) if torch.compiler.is_compiling() else _CodeMass.apply(logits, keep)


class BinaryEntropy(torch.autograd.Function):
    """Entropy of Bernoulli(sigmoid(l)), elementwise, with the closed-form derivative
    -l sigmoid(l) sigmoid(-l) (autograd of the forward formula cancels for small |l|)."""

    @staticmethod
    def forward(ctx, logits):
        # symmetric in l; with a = |l| and s = sigmoid(-a): softplus(-a) + a s = -log1p(-s) + a s,
        # two non-negative terms (sigmoid(l) softplus(-l) + sigmoid(-l) softplus(l), with
        # softplus(a) = softplus(-a) + a). Past a = 87, s < 1.7e-38 is taken as 0 (EXP_FLOOR).
        magnitude = logits.abs().clamp(max=-EXP_FLOOR)
        unlikely = F.threshold(torch.sigmoid(-magnitude), P_FLOOR, 0.0)
        ctx.save_for_backward(logits, unlikely)
        return magnitude * unlikely - torch.log1p(-unlikely)

    @staticmethod
    def backward(ctx, grad):
        logits, unlikely = ctx.saved_tensors  # sigmoid(l) sigmoid(-l) = s (1 - s), s = sigmoid(-|l|)
        if torch.is_grad_enabled():  # double backward: recomputed, so that autograd sees s depend on l
            unlikely = F.threshold(torch.sigmoid(-logits.abs().clamp(max=-EXP_FLOOR)), P_FLOOR, 0.0)
        return (grad * logits) * (unlikely * (unlikely - 1))


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy of Bernoulli(sigmoid(l)), elementwise: sigmoid(l) softplus(-l) + sigmoid(-l) softplus(l)
    = softplus(-|l|) + |l| sigmoid(-|l|)."""
    return BinaryEntropy.apply(logits)
