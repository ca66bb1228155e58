"""Tests of LFQ's entropies (`vq_layers.lfq_entropy_loss.lfq_entropy`, built on the ops of
`vq_layers.kernels.lfq_entropy`) against an fp64 brute force over all 2^d codes.

The reference (`brute_force`) never calls the code under test: it builds every code's bits,
log p(k | n) = sum_i [b_ki logsigmoid(l_ni) + (1 - b_ki) logsigmoid(-l_ni)] in float64, the
(n, c, 2^d) probabilities, and both entropies from them; its gradients come from autograd.

Accuracy metric (what "to 1e-6 relative" means in this file): an error is measured against the
magnitude of the terms the result is a sum of, which is what fp32 inputs can be asked for.

- per-sample entropy: |ours - ref| <= tol * |ref| (+ 1e-37: below that fp32 underflows);
  a sum of non-negative binary entropies, so this is plain relative error.
- codebook entropy H = -sum_k P_k log P_k:  |ours - ref| <= tol * (H_ref + 1), where
  H + 1 = sum_k P_k (|log P_k| + 1) is the magnitude of its terms (its condition number for
  relative errors in P_k). Plain relative error is not attainable when H is tiny: the main
  code's P = 1 - delta rounds to 1.0 in fp32 and its term delta (1 + O(delta)) is lost (measured:
  5% of H = 3.4e-8, for identical tokens at T = 100, d = 12; 2.7e-6 of H = 0.1 at T = 1, d = 1).
- gradients of a * per_sample + b * codebook:
      max_elements |grad - grad_ref|  <=  tol * (|a| * S_ps + |b| * S_cb)
  with S_ps = max |d per_sample_ref / d logits| (the plain "max abs of the reference") and
  S_cb = max over (n, c, i) of (1 / (n c)) sum_k (|log P_ck| + 1) |d p_c(k | n) / d l_nci|,
  the magnitude of the terms whose sum is the codebook-entropy gradient (>= its max abs).
  The plain max-abs metric is too strict for fp32 in two ill-conditioned places: (1) near a
  uniform batch distribution the codebook gradient is a difference of log P_k that fp32 P_k
  (6e-8 relative) only resolves to ~1e-7 absolute, while the gradient itself can be 1e-2 of
  that scale (measured: up to 2.6e-5 relative to max abs at T = 0.1, d = 1); (2) the per-sample
  and codebook gradients partly cancel in the mix (measured: up to 2e-6 relative to the mix's
  max abs). This metric still sees any error that is O(1) relative to a gradient term, which
  is what a wrong formula, a dropped term or a wrong path produces.

Two tests pin down bugs found while writing them, now fixed (see their docstrings):
test_all_confident_batch_gradient (sparse path, codebook gradient of confident bits) and
test_per_sample_gradient_at_small_logits (binary_entropy's gradient at small logits).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vq_layers.kernels.lfq_entropy as lfq
from benchmarks.host_syncs import DispatchCount
from dist_utils import run_in_processes
from vq_layers.kernels.lfq_entropy import code_mass
from vq_layers.lfq_entropy_loss import lfq_entropy

TOL = 1e-6
TEMPERATURES = [0.1, 1.0, 10.0, 100.0, 1000.0]
BITS = [1, 2, 5, 8, 11]
# (a, b) of the losses a * per_sample + b * codebook whose gradients are checked
LOSSES = [(1.0, -0.7), (1.0, 0.0), (0.0, 1.0)]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------------
# fp64 reference


def bits64(d: int) -> torch.Tensor:
    """(2^d, d) float64 bits of every code, most significant first: bit i of k = (k >> (d-1-i)) & 1."""
    codes = torch.arange(2**d)
    return ((codes[:, None] >> torch.arange(d - 1, -1, -1)) & 1).double()


def brute_logp(logits: torch.Tensor) -> torch.Tensor:
    """log p(k | n) (n, c, 2^d) from logits (n, c, d), in the logits' (float64) dtype."""
    bits = bits64(logits.shape[-1])
    return F.logsigmoid(logits) @ bits.T + F.logsigmoid(-logits) @ (1 - bits).T


def brute_force(logits: torch.Tensor):
    """(per_sample, codebook, mass (c, 2^d)) by enumeration; differentiable; 0 log 0 = 0."""
    n, c, d = logits.shape
    logp = brute_logp(logits)
    p = logp.exp()
    # logp is finite for finite logits, so an underflowed p gives p * logp = 0 (0 log 0 = 0)
    per_sample = -(p * logp).sum() / max(n * c, 1)
    mass = p.sum(0)
    probs = mass / max(n, 1)
    codebook = -(probs * torch.where(probs > 0, probs, 1.0).log()).sum(-1).mean()
    return per_sample, codebook, mass


def grad_scales(logits: torch.Tensor) -> tuple[float, float]:
    """(S_ps, S_cb) of the module docstring, in float64."""
    n, c, d = logits.shape
    if n == 0:
        return 0.0, 0.0
    l64 = logits.detach().double().requires_grad_()
    per_sample, _, _ = brute_force(l64)
    (g,) = torch.autograd.grad(per_sample, l64)
    with torch.no_grad():
        l64 = l64.detach()
        bits = bits64(d)
        p = brute_logp(l64).exp()
        probs = p.sum(0) / n
        weight = p * (torch.where(probs > 0, probs, 1.0).log().abs() + 1)  # (n, c, K)
        # |dp(k|n)/dl_i| = p(k|n) sigmoid(-l_i) where b_ki = 1, p(k|n) sigmoid(l_i) where b_ki = 0
        terms = torch.sigmoid(-l64) * (weight @ bits) + torch.sigmoid(l64) * (weight @ (1 - bits))
        return g.abs().max().item(), (terms / (n * c)).max().item()


def assert_values(per_sample, codebook, ref_ps, ref_cb, tol: float = TOL) -> float:
    """Asserts the value metric of the module docstring; returns the larger of the two errors."""
    ps, cb, ref_ps, ref_cb = (float(torch.as_tensor(v).detach()) for v in (per_sample, codebook, ref_ps, ref_cb))
    assert abs(ps - ref_ps) <= tol * abs(ref_ps) + 1e-37, f"per_sample {ps!r} vs fp64 {ref_ps!r}"
    assert abs(cb - ref_cb) <= tol * (abs(ref_cb) + 1), f"codebook {cb!r} vs fp64 {ref_cb!r}"
    return max(abs(ps - ref_ps) / abs(ref_ps) if ref_ps else 0.0, abs(cb - ref_cb) / (abs(ref_cb) + 1))


def check_against_reference(logits: torch.Tensor, tol: float = TOL) -> dict:
    """Asserts values and gradients of lfq_entropy on fp32 `logits` equal the fp64 brute force.

    Returns the measured errors: 'value' (max relative value error), 'grad' (max error in the
    docstring's metric), 'grad_plain' (max error relative to the max abs of the reference).
    """
    l32 = logits.detach().float().clone().requires_grad_()
    l64 = logits.detach().double().requires_grad_()
    per_sample, codebook = lfq_entropy(l32)
    ref_ps, ref_cb, _ = brute_force(l64)
    assert per_sample.dtype == codebook.dtype == torch.float32
    assert per_sample.shape == codebook.shape == ()
    errors = {"value": assert_values(per_sample, codebook, ref_ps, ref_cb, tol),
              "grad": 0.0, "grad_plain": 0.0}
    s_ps, s_cb = grad_scales(logits)
    for a, b in LOSSES:
        (grad,) = torch.autograd.grad(a * per_sample + b * codebook, l32, retain_graph=True)
        (ref,) = torch.autograd.grad(a * ref_ps + b * ref_cb, l64, retain_graph=True)
        assert grad.shape == logits.shape and grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        err = (grad.double() - ref).abs().max().item() if grad.numel() else 0.0
        scale = abs(a) * s_ps + abs(b) * s_cb
        assert err <= tol * scale, (
            f"grad of {a} * per_sample + {b} * codebook: max error {err:.3g}, "
            f"{err / scale if scale else math.inf:.3g} of the scale {scale:.3g}"
        )
        errors["grad"] = max(errors["grad"], err / scale if scale else 0.0)
        plain = ref.abs().max().item() if ref.numel() else 0.0
        errors["grad_plain"] = max(errors["grad_plain"], err / plain if plain else 0.0)
    return errors


def normal_logits(n, c, d, temperature, seed):
    """logits = 4 T x, x ~ N(0, 1): LFQ's logits at inv_temperature T (p(bit) = sigmoid(4 T x))."""
    generator = torch.Generator().manual_seed(seed)
    return 4 * temperature * torch.randn(n, c, d, generator=generator)


# --------------------------------------------------------------------------------------------
# forcing and observing the two paths


@contextlib.contextmanager
def constants(**values):
    """Temporarily sets the kernel module's constants (read at call time by the op)."""
    old = {name: getattr(lfq, name) for name in values}
    try:
        for name, value in values.items():
            setattr(lfq, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(lfq, name, value)


@contextlib.contextmanager
def path_spy():
    """Counts the tokens each path sees (forward and backward): {'dense': int, 'sparse': int}."""
    seen = {"dense": 0, "sparse": 0}
    dense, sparse = lfq._dense_mass, lfq._sparse_mass

    def dense_spy(logits, *args, **kwargs):
        seen["dense"] += logits.shape[0]
        return dense(logits, *args, **kwargs)

    def sparse_spy(logits, *args, **kwargs):
        seen["sparse"] += logits.shape[0]
        return sparse(logits, *args, **kwargs)

    lfq._dense_mass, lfq._sparse_mass = dense_spy, sparse_spy
    try:
        yield seen
    finally:
        lfq._dense_mass, lfq._sparse_mass = dense, sparse


# the per-token choice (what the CPU does beyond CPU_DENSE_MAX_PAIRS; small test batches would
# otherwise be all dense)
PARTITIONED = {"CPU_DENSE_MAX_PAIRS": 0}
# all-dense: max_sparse = min(-1, ...) = -1 < any token's count of uncertain bits.
ALL_DENSE = {**PARTITIONED, "MAX_SPARSE_BITS": -1}
# all-sparse: max_sparse = min(64, d - 0) = d >= any token's count of uncertain bits.
ALL_SPARSE = {**PARTITIONED, "MAX_SPARSE_BITS": 64, "SPARSE_CODES_FRACTION_LOG2": 0}
# tiny tiles: dense chunks of 100 // (c (2^(d//2) + 2^(d - d//2))) tokens (at least 1), sparse of 100 // 2^u.
TINY_TILES = {"TILE_ELEMENTS": 100}
MODES = {"default": {}, "partitioned": PARTITIONED, "all_dense": ALL_DENSE, "all_sparse": ALL_SPARSE,
         "tiny_tiles": TINY_TILES, "one_token_tiles": {"TILE_ELEMENTS": 1}}


def grid_tokens(d: int) -> int:
    return 64 if d <= 8 else 32


# --------------------------------------------------------------------------------------------
# 1. values and gradients against the fp64 brute force


@pytest.mark.parametrize("mode", ["default", "partitioned"])  # small batches: all dense by default
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("d", BITS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_brute_force(temperature, d, c, mode):
    # the first seed whose batch has an uncertain bit (|l| < 30; at T = 1000 and few bits a batch
    # may have none: that all-confident case is test_all_confident_batch_gradient's)
    seed = d * 10 + c
    while not ((logits := normal_logits(grid_tokens(d), c, d, temperature, seed)).abs() < 30).any():
        seed += 1000
    with constants(**MODES[mode]):
        check_against_reference(logits)


@pytest.mark.parametrize("mode", ["all_dense", "all_sparse", "tiny_tiles", "one_token_tiles"])
@pytest.mark.parametrize("d", [1, 5, 11])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
def test_forced_paths_match_brute_force(temperature, d, mode):
    n = 33 if mode == "one_token_tiles" else 40  # not a multiple of any chunk
    logits = normal_logits(n, 2, d, temperature, seed=d)
    with constants(**MODES[mode]), path_spy() as seen:
        check_against_reference(logits)
    if mode == "all_dense":
        assert seen["sparse"] == 0 and seen["dense"] > 0
    if mode == "all_sparse":
        assert seen["dense"] == 0 and seen["sparse"] > 0


@st.composite
def mixed_batches(draw):
    """Batches where, in every codebook, some tokens take the sparse path and some the dense one.

    Token t has u_t uncertain bits (|l| < 30: N(0, s), clipped to 29.5) at random positions, the
    others confident (|l| >= 30, optionally exactly 30, the boundary). Token 0 is sparse
    (u <= d - 3), token 1 dense (u > d - 3) with one bit of |l| in [0.5, 3] so that the
    gradient is not tiny. The tile size is drawn too (default, 1, 100 elements).
    """
    d = draw(st.integers(3, 9))
    c = draw(st.integers(1, 2))
    n = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    confident_min = draw(st.sampled_from([30.0, 31.0, 60.0, 1e4]))
    boundary = draw(st.booleans())
    spread = draw(st.sampled_from([0.5, 4.0, 12.0]))
    uncertain = [draw(st.integers(0, d - 3)), draw(st.integers(d - 2, d))]
    uncertain += draw(st.lists(st.integers(0, d), min_size=n - 2, max_size=n - 2))
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, c, d, generator=g) < 0.5, -1.0, 1.0)
    confident = sign * confident_min * (1 + 3 * torch.rand(n, c, d, generator=g))
    if boundary:
        confident[..., 0] = sign[..., 0] * 30.0
    small = (spread * torch.randn(n, c, d, generator=g)).clamp(-29.5, 29.5)
    rank = torch.rand(n, c, d, generator=g).argsort(-1).argsort(-1)  # random order of positions
    is_uncertain = rank < torch.tensor(uncertain)[:, None, None]
    # token 1's first uncertain bit (u_1 >= 1 of them) has |l| in [0.5, 3]: a per-sample gradient
    # -l sigmoid(l) sigmoid(-l) / (n c) of order 0.2 / (n c) (near l = 0 it vanishes, and the
    # per-sample gradient is then inaccurate: test_per_sample_gradient_at_small_logits)
    small[1][rank[1] == 0] = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0) * (
        0.5 + 2.5 * torch.rand(c, generator=g))
    logits = torch.where(is_uncertain, small, confident)
    tiles = draw(st.sampled_from([{}, {"TILE_ELEMENTS": 1}, {"TILE_ELEMENTS": 100}]))
    return logits, {**PARTITIONED, **tiles}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_batches())
def test_mixed_paths_in_one_call_match_brute_force(batch):
    logits, tiles = batch
    with constants(**tiles), path_spy() as seen:
        check_against_reference(logits)
    assert seen["dense"] > 0 and seen["sparse"] > 0  # both paths ran in the one call


def test_all_confident_batch_gradient():
    """Every bit confident (|l| in [31, 60]), as at inv_temperature=100 late in training.

    The codebook entropy's gradient for confident bit i of token n is, to first order in
    s = sigmoid(-|l_ni|),  s [G(k) - G(k')],  k the token's likely code, k' = k with bit i
    flipped, G(k) = -(log P_k + 1) / (n c); log P_k' ~ -|l| makes G(k') the larger part. The
    sparse path never visits k' and returns s sum_k p(k|n) (G(k) - centre) instead, which is
    ~0 (measured on this batch: max |grad| 2.6e-16 against the true 1.4e-14, error 100% of the
    reference's max abs, cosine similarity with the true gradient ~1e-14). Absolute size ~1e-14,
    but it is the only codebook gradient in such a batch and scale-free optimizers (Adam) act on
    its direction. The dense path gets it to 1e-7 (test_all_confident_batch_dense_is_exact), so
    fp32 is not the limit. (Fixed: the sparse backward now adds each corner's single-bit flips.)
    """
    logits = _all_confident_logits()
    l32 = logits.clone().requires_grad_()
    l64 = logits.double().requires_grad_()
    (grad,) = torch.autograd.grad(lfq_entropy(l32)[1], l32)
    (ref,) = torch.autograd.grad(brute_force(l64)[1], l64)
    assert (grad.double() - ref).abs().max() <= TOL * ref.abs().max()


def test_per_sample_gradient_at_small_logits():
    """logits = 4 T x at T = 0.001 (|l| ~ 0.004): early training, or a low inv_temperature.

    The per-sample entropy sum_i h(l_i), h(l) = sigmoid(l) softplus(-l) + sigmoid(-l) softplus(l),
    has h'(l) = -l sigmoid(l) sigmoid(-l): perfectly conditioned (relative error in l gives the
    same relative error in h'). binary_entropy leaves it to autograd, which forms
    sigmoid'(l) (softplus(-l) - softplus(l)) + (sigmoid(-l) sigmoid(l) - sigmoid(l) sigmoid(-l))
    from terms of size ~0.17 that cancel to l / 4 (measured per element: 2.6e-3 relative error
    at l = 1e-4, 1.3e-4 at 1e-3, 1.8e-5 at 1e-2; over the batch, relative to the max abs of the
    reference: 2.8e-5 at T = 0.001, 3e-6 at T = 0.01, 1e-6 at T = 0.03, fine at T >= 0.1).
    (Fixed: binary_entropy has the closed-form backward.)
    """
    logits = normal_logits(64, 2, 5, 0.001, seed=3)
    l32 = logits.clone().requires_grad_()
    l64 = logits.double().requires_grad_()
    (grad,) = torch.autograd.grad(lfq_entropy(l32)[0], l32)
    (ref,) = torch.autograd.grad(brute_force(l64)[0], l64)
    assert (grad.double() - ref).abs().max() <= TOL * ref.abs().max()


def _all_confident_logits():
    g = torch.Generator().manual_seed(1)
    shape = (16, 1, 4)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return sign * (31 + 29 * torch.rand(shape, generator=g))


@pytest.mark.parametrize("mode", ["default", "all_dense", "all_sparse"])
def test_double_backward_matches_fp64(mode):
    """backward(create_graph=True) differentiates the backward itself (gradient penalties,
    Hessian-vector products): the HVP of a * per_sample + b * codebook equals the fp64 one."""
    logits = normal_logits(40, 2, 5, 1.0, seed=11).requires_grad_()
    v = torch.randn(40, 2, 5, generator=torch.Generator().manual_seed(12))
    results = []
    for x in (logits, logits.detach().double().requires_grad_()):
        with constants(**MODES[mode]) if x.dtype == torch.float32 else contextlib.nullcontext():
            per_sample, codebook = lfq_entropy(x) if x.dtype == torch.float32 else brute_force(x)[:2]
            (grad,) = torch.autograd.grad(per_sample - 0.7 * codebook, x, create_graph=True)
            (hvp,) = torch.autograd.grad((grad * v.to(x.dtype)).sum(), x)
        results.append(hvp)
    scale = results[1].abs().max().item()
    assert scale > 1e-3
    assert (results[0].double() - results[1]).abs().max().item() <= 1e-5 * scale


def test_all_confident_batch_dense_is_exact():
    """The same batch through the dense path: fp32 resolves these 1e-14 gradients to 1e-7."""
    with constants(**ALL_DENSE):
        check_against_reference(_all_confident_logits())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sync_free_path_matches_sparse_path_and_fp64(temperature, masked, monkeypatch):
    """VQ_LAYERS_SYNC_FREE=1 (what CUDA tensors do): every token dense, both codebooks batched,
    dropped tokens as zero weights, no host sync; the same masses, entropies and gradients as the
    sparse-exact path and as the fp64 brute force over the kept tokens."""
    n, c, d = 48, 2, 7
    logits = normal_logits(n, c, d, temperature, seed=11)
    logits[0, 0, :2] = torch.tensor([0.5, -1.5])  # some uncertain bits at every temperature
    keep = torch.arange(n) % 3 != 1 if masked else None

    def run():
        l32 = logits.clone().requires_grad_()
        with DispatchCount() as counted:
            per_sample, codebook = lfq_entropy(l32, keep=keep)
            (grad,) = torch.autograd.grad(per_sample - 0.7 * codebook, l32)
            mass = code_mass(logits, keep)
        return (per_sample, codebook, mass, grad), counted.syncs

    with constants(**ALL_SPARSE), path_spy() as seen:
        sparse, _ = run()
    assert seen["sparse"] > 0 and seen["dense"] == 0
    monkeypatch.setenv("VQ_LAYERS_SYNC_FREE", "1")
    with constants(**PARTITIONED), path_spy() as seen:  # the sync-free path wins over the CPU's choice
        free, syncs = run()
    assert seen["sparse"] == 0 and seen["dense"] > 0 and syncs == []
    for ours, theirs in zip(free, sparse):
        torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL * theirs.abs().max().item())
    kept = logits if keep is None else logits[keep]
    l64 = kept.double().requires_grad_()
    ref_ps, ref_cb, ref_mass = brute_force(l64)
    assert_values(free[0], free[1], ref_ps, ref_cb)
    torch.testing.assert_close(free[2].double(), ref_mass, rtol=0, atol=TOL * ref_mass.abs().max().item())
    (ref_grad,) = torch.autograd.grad(ref_ps - 0.7 * ref_cb, l64)
    grad = free[3] if keep is None else free[3][keep]
    s_ps, s_cb = grad_scales(kept)
    assert (grad.double() - ref_grad).abs().max() <= TOL * (s_ps + 0.7 * s_cb)
    if keep is not None:
        assert (free[3][~keep] == 0).all()


# --------------------------------------------------------------------------------------------
# 2. code_mass


@pytest.mark.parametrize("mode", ["default", "all_dense", "all_sparse", "tiny_tiles"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("d", [1, 6, 10])
def test_code_mass(d, temperature, mode):
    n, c = 50, 2
    logits = normal_logits(n, c, d, temperature, seed=3 + d)
    logits[: n // 2, 1] *= 40  # codebook 1: half its tokens very confident
    l32 = logits.clone().requires_grad_()
    l64 = logits.double().requires_grad_()
    with constants(**MODES[mode]):
        mass = code_mass(l32)
        _, _, ref = brute_force(l64)
        assert mass.shape == (c, 2**d) and mass.dtype == torch.float32
        assert (mass >= 0).all()
        torch.testing.assert_close(mass.sum(-1).double(), torch.full((c,), float(n), dtype=torch.float64),
                                   rtol=TOL, atol=0)
        assert (mass.double() - ref).abs().max() <= TOL * ref.abs().max()
        # backward with an arbitrary cotangent w: d/dl sum_k w_k mass_k, against the terms'
        # magnitude sum_k |w_k| |dp(k|n)/dl| (as the docstring's S_cb, with |w| for |log P| + 1)
        w = torch.randn(c, 2**d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
        (grad,) = torch.autograd.grad((mass * w.float()).sum(), l32)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), l64)
    with torch.no_grad():
        logits64 = logits.double()
        p, bits = brute_logp(logits64).exp(), bits64(d)
        pw = p * w.abs()
        terms = torch.sigmoid(-logits64) * (pw @ bits) + torch.sigmoid(logits64) * (pw @ (1 - bits))
    assert (grad.double() - grad_ref).abs().max() <= TOL * terms.max()


def test_code_mass_bit_order():
    """Code k's bit i is (k >> (d-1-i)) & 1: the first logit is the most significant bit."""
    logits = torch.tensor([[[50.0, -50.0, -50.0]], [[-50.0, 50.0, 50.0]], [[-50.0, -50.0, 50.0]]])
    for mode in ["default", "all_dense"]:
        with constants(**MODES[mode]):
            mass = code_mass(logits)
        expected = torch.zeros(1, 8)
        expected[0, [0b100, 0b011, 0b001]] = 1.0
        torch.testing.assert_close(mass, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 3. memory: no (n, 2^d) tensor


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.ops = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                elements = t.untyped_storage().nbytes() // t.element_size()
                if elements > self.largest:
                    self.largest, self.op = elements, func
        return out


def test_allocation_recorder_sees_a_dense_tensor():
    """The recorder itself: a naive (n, 2^d) computation, in forward and in backward."""
    n, d = 64, 10
    logits = torch.randn(n, 1, d, requires_grad=True)
    with LargestAllocation() as forward:
        loss = brute_logp(logits.double()).exp().sum(0).square().sum()
    with LargestAllocation() as backward:
        loss.backward()
    assert forward.largest >= n * 2**d and backward.largest >= n * 2**d


@pytest.mark.parametrize("tile", [None, 2**12])
@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_no_n_by_codes_tensor(temperature, tile):
    n, d = 4096, 16
    logits = normal_logits(n, 1, d, temperature, seed=7).requires_grad_()
    tiles = {} if tile is None else {"TILE_ELEMENTS": tile}
    with constants(**tiles), path_spy() as seen:
        with LargestAllocation() as forward:
            per_sample, codebook = lfq_entropy(logits)
        with LargestAllocation() as backward:
            (per_sample - 0.7 * codebook).backward()
        tile_elements = lfq.TILE_ELEMENTS
    assert torch.isfinite(logits.grad).all()
    assert backward.ops > 0  # the mode sees the backward's ops
    # the regime: T=1 is all dense (every bit uncertain), T=100 almost all sparse
    if temperature == 1.0:
        assert seen["sparse"] == 0 and seen["dense"] > 0
    else:
        assert seen["sparse"] > seen["dense"]
    bound = 4 * max(tile_elements, n * d, 2**d)
    for mode in (forward, backward):
        assert mode.largest < n * 2**d // 8, (mode.op, mode.largest)
        assert mode.largest <= bound, (mode.op, mode.largest, bound)


# --------------------------------------------------------------------------------------------
# 4. edge cases


@pytest.mark.parametrize("mode", ["default", "all_dense", "all_sparse"])
@pytest.mark.parametrize("c, d", [(1, 1), (3, 6)])
def test_no_tokens(c, d, mode):
    logits = torch.zeros(0, c, d, requires_grad=True)
    with constants(**MODES[mode]):
        per_sample, codebook = lfq_entropy(logits)
        assert per_sample.item() == 0.0 and codebook.item() == 0.0
        assert per_sample.shape == codebook.shape == ()
        (per_sample - 0.7 * codebook).backward()
        assert code_mass(torch.zeros(0, c, d)).equal(torch.zeros(c, 2**d))
    assert logits.grad.shape == (0, c, d)


@pytest.mark.parametrize("mode", ["default", "all_dense", "all_sparse"])
@pytest.mark.parametrize("magnitude", [1e30, torch.finfo(torch.float32).max])
def test_huge_logits(magnitude, mode):
    d = 6
    g = torch.Generator().manual_seed(5)
    sign = torch.where(torch.rand(20, 2, d, generator=g) < 0.5, -1.0, 1.0)
    huge = sign * magnitude
    mixed = huge.clone()
    mixed[:10, :, :3] = torch.randn(10, 2, 3, generator=g)  # some tokens have uncertain bits
    with constants(**MODES[mode]):
        for logits in (huge, mixed):
            l32 = logits.clone().requires_grad_()
            per_sample, codebook = lfq_entropy(l32)
            (per_sample - 0.7 * codebook).backward()
            assert torch.isfinite(per_sample) and torch.isfinite(codebook)
            assert torch.isfinite(l32.grad).all()
            ref_ps, ref_cb, _ = brute_force(logits.double())
            assert_values(per_sample, codebook, ref_ps, ref_cb)
            # the huge bits' true gradient is sigmoid(-|l|)... = 0 in fp32 (and fp64)
            assert (l32.grad[logits.abs() == magnitude] == 0).all()
        check_against_reference(mixed)


@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("d", [1, 5, 12])
def test_identical_tokens(d, temperature, expanded):
    """All tokens equal: the batch distribution is each token's, so the two entropies agree
    (to the codebook metric's tol * (H + 1): at T = 100 H is ~1e-8 and fp32 P rounds to 1)."""
    one = normal_logits(1, 2, d, temperature, seed=11)
    logits = one.expand(37, 2, d) if expanded else one.repeat(37, 1, 1)
    per_sample, codebook = lfq_entropy(logits)
    assert abs(codebook.item() - per_sample.item()) <= TOL * (per_sample.item() + 1)
    ref_ps, ref_cb, _ = brute_force(one.double())
    assert abs(ref_ps.item() - ref_cb.item()) <= 1e-12 * (ref_ps.item() + 1)  # the identity, fp64
    assert_values(per_sample, codebook, ref_ps, ref_cb)


@pytest.mark.parametrize("mode", ["default", "all_dense", "all_sparse"])
def test_one_bit_closed_form(mode):
    """d = 1: per_sample = mean H_b(sigmoid(l)), codebook = H_b(mean sigmoid(l)) (code 1 = bit 1)."""
    logits = torch.cat([4 * torch.randn(30, 3, 1, generator=torch.Generator().manual_seed(2)),
                        torch.full((5, 3, 1), 45.0), torch.full((5, 3, 1), -1e30)])
    with constants(**MODES[mode]):
        per_sample, codebook = lfq_entropy(logits)
        mass = code_mass(logits)
    q = torch.sigmoid(logits.double())

    def h(p):
        return -(p * torch.where(p > 0, p, 1).log() + (1 - p) * torch.where(p < 1, 1 - p, 1).log())

    assert_values(per_sample, codebook, h(q).mean(), h(q.mean(0)).mean())
    torch.testing.assert_close(mass[:, 1].double(), q.sum(0)[:, 0], rtol=TOL, atol=0)


def test_large_codebook_values_and_gradients():
    """d = 16 (65536 codes) on a few tokens, both regimes, against the brute force."""
    check_against_reference(normal_logits(12, 1, 16, 1.0, seed=1))
    check_against_reference(normal_logits(12, 1, 16, 100.0, seed=1) + torch.tensor([0.5] + [0.0] * 15))


# --------------------------------------------------------------------------------------------
# 5. agreement with vector-quantize-pytorch


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("d", [4, 5, 6])
@pytest.mark.parametrize("temperature", [0.03, 0.1])
def test_matches_vector_quantize_pytorch(temperature, d, c):
    """Its LFQ (train mode) takes softmax(2 T x . code) over the +-1 codes, i.e. independent bits
    with p(bit) = sigmoid(4 T x), and log(clamp(p, 1e-5)); where all p > 1e-5 it is exact."""
    LFQ = pytest.importorskip("vector_quantize_pytorch").LFQ
    torch.manual_seed(0)
    peer = LFQ(dim=c * d, codebook_size=2**d, num_codebooks=c, entropy_loss_weight=1.0).train()
    x = torch.randn(2, 40, c * d, generator=torch.Generator().manual_seed(d))
    _, breakdown = peer(x, inv_temperature=temperature, return_loss_breakdown=True)
    logits = 4 * temperature * x.reshape(-1, c, d)
    assert brute_logp(logits.double()).exp().min() > 1e-5  # precondition: the clamp is inactive
    per_sample, codebook = lfq_entropy(logits)
    torch.testing.assert_close(per_sample, breakdown.per_sample_entropy.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codebook, breakdown.batch_entropy.float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 6. distributed: 2 gloo ranks, global batch = concatenation of the ranks' tokens

WORLD = 2
# (tokens on each rank, seed): different counts; a rank with none; no tokens anywhere
DIST_CASES = [((37, 21), 1), ((0, 29), 2), ((0, 0), 3)]
DIST_C, DIST_D = 2, 7


def _dist_logits(rank: int, n: int, seed: int) -> torch.Tensor:
    """Rank `rank`'s tokens: a pure function of (rank, seed). Half T=1 (dense), half T=100."""
    g = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(n, DIST_C, DIST_D, generator=g)
    temperature = torch.where(torch.arange(n) % 2 == 0, 1.0, 100.0)[:, None, None]
    return 4 * temperature * x


def _dist_worker(rank: int, world: int) -> None:
    # A one-rank group per rank (every rank must create every group): lfq_entropy over it is the
    # single-process computation (no collective runs), while the default group spans both ranks.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    for counts, seed in DIST_CASES:
        parts = [_dist_logits(r, counts[r], seed) for r in range(world)]
        start = sum(counts[:rank])
        mine = slice(start, start + counts[rank])
        full = torch.cat(parts).requires_grad_()
        local = parts[rank].clone().requires_grad_()
        per_sample, codebook = lfq_entropy(local)  # default group: both ranks
        single_ps, single_cb = lfq_entropy(full, process_group=alone)
        ref_ps, ref_cb, _ = brute_force(full.detach().double())
        assert_values(per_sample, codebook, single_ps, single_cb)
        assert_values(per_sample, codebook, ref_ps, ref_cb)
        # every rank holds the same values, bit for bit
        values = torch.stack([per_sample, codebook]).detach()
        gathered = [torch.empty_like(values) for _ in range(world)]
        dist.all_gather(gathered, values)
        assert all(v.equal(gathered[0]) for v in gathered), gathered
        # Gradients. Every rank computes the same global loss L(all logits) and back-propagates
        # it through its local logits. The cross-rank sums in lfq_entropy (all_reduce_sum) have
        # the DDP-convention backward: the incoming gradients of all ranks are summed. Each rank's
        # incoming gradient at a sum is dL/d(sum), identical on every rank, so each receives
        # world * dL/d(sum), and its local gradient is d(sum over ranks of L)/d(local logits)
        # = world * dL/d(local logits) = world * (the single-process gradient of L on the
        # concatenated logits, restricted to this rank's rows). DDP then averages the ranks'
        # parameter gradients, i.e. divides by world: the objective is L, as intended.
        s_ps, s_cb = grad_scales(full.detach())
        for a, b in LOSSES:
            def loss(ps, cb):
                return a * ps + b * cb if a and b else (ps if a else cb)

            (grad,) = torch.autograd.grad(loss(per_sample, codebook), local, retain_graph=True)
            (single,) = torch.autograd.grad(loss(single_ps, single_cb), full, retain_graph=True)
            assert grad.shape == local.shape
            expected = world * single[mine]
            err = (grad - expected).abs().max().item() if grad.numel() else 0.0
            assert err <= TOL * world * (abs(a) * s_ps + abs(b) * s_cb), (counts, a, b, err)


def test_distributed_matches_single_process():
    run_in_processes(_dist_worker, WORLD, timeout=120)
