"""Tests of ResidualFSQ and GroupedResidualFSQ against an fp64 re-implementation of the formulas.

The reference (`reference`) is written here from the description of the scheme, not from the
code under test:

- residual_0 = softclamp(z) = tanh(z / c) * c, c = 1 + 1/(L-1) per dimension with the hard clamp
  (or the user's `soft_clamp_input_value` with `bound_hard_clamp=False`, none if not given);
- stage k quantizes u = residual_k / s_k, s_k = (L-1)^-k, on the symmetric grid:
  level = floor((L-1) * (squash(u) + 1) / 2 + 0.5), squash = clamp(-1, 1) (hard) or tanh,
  code = level * 2/(L-1) - 1, index = sum_i level_i * prod_{j<i} L_j;
- residual_{k+1} = residual_k - code_k * s_k, output = sum_k code_k * s_k (then project_out).

Tokens where some stage's position (L-1)*(squash(u)+1)/2 + 0.5 lies within ~1e-4 of an integer
are genuine near-ties (fp32 and fp64 may round differently) and are left out of index checks.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtype_matrix import dtype_matrix, run_cell
from reference import brute_force_usage, call_structure, linear64, randn
from vq_layers import GroupedResidualFSQ, ResidualFSQ

F64 = torch.float64
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------
# fp64 reference


def reference(z, levels, num_quantizers, *, hard=True, soft_clamp=None, kept=None):
    """fp64 residual FSQ of already-projected tokens z (..., d); `kept` stages (rest dropped)."""
    z = z.detach().to(F64)
    steps = torch.tensor(levels, dtype=F64) - 1
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.long)
    kept = num_quantizers if kept is None else kept
    c = 1 + 1 / steps if hard else (None if soft_clamp is None else torch.as_tensor(soft_clamp, dtype=F64))
    if c is not None:
        t = torch.tanh(z / c)
        softclamped, dsoft = t * c, 1 - t**2
    else:
        softclamped, dsoft = z, torch.ones_like(z)

    residual, out = softclamped, torch.zeros_like(z)
    codes, indices = [], []
    near_tie = torch.zeros(z.shape[:-1], dtype=torch.bool)
    near_edge = torch.zeros(z.shape[:-1], dtype=torch.bool)
    dsum = torch.zeros_like(z)
    for k in range(num_quantizers):
        s = steps ** (-k)
        if k >= kept:
            codes.append(torch.zeros_like(z))
            indices.append(torch.full(z.shape[:-1], -1, dtype=torch.long))
            continue
        u = residual / s
        if hard:
            squashed = u.clamp(-1, 1)
            dsquash = ((u >= -1) & (u <= 1)).to(F64)
            near_edge |= ((u.abs() - 1).abs() < 1e-5).any(-1)
        else:
            squashed = torch.tanh(u)
            dsquash = 1 - squashed**2
        position = steps * (squashed + 1) / 2 + 0.5
        level = torch.floor(position)
        # fp32 rounding of the input (~1e-7) is amplified by 1/s_k in later stages
        margin = 1e-4 + 1e-6 * steps ** (k + 1)
        near_tie |= ((position - torch.round(position)).abs() < margin).any(-1)
        stage = (level * 2 / steps - 1) * s
        residual = residual - stage
        out = out + stage
        dsum = dsum + dsquash
        codes.append(stage)
        indices.append((level.long() * basis).sum(-1))
    return SimpleNamespace(
        softclamped=softclamped,
        out=out,
        codes=torch.stack(codes),
        indices=torch.stack(indices, dim=-1),
        near_tie=near_tie,
        near_edge=near_edge,
        dz=dsoft * dsum,  # d output / d z, elementwise (straight-through rule)
    )


def reference_layer(layer, x_tokens, **kw):
    """Reference of a ResidualFSQ (projections in fp64 with its weights) on tokens (..., dim)."""
    z = linear64(layer.project_in, x_tokens) if layer.has_projections else x_tokens.detach().to(F64)
    ref = reference(z, layer.levels, layer.num_quantizers, **kw)
    ref.z = z
    ref.projected_out = linear64(layer.project_out, ref.out) if layer.has_projections else ref.out
    return ref


def assert_indices_match(indices, ref, min_fraction=0.5):
    ok = ~ref.near_tie
    assert ok.float().mean() >= min_fraction, "too many near-ties for a meaningful check"
    assert indices.dtype == torch.long
    assert torch.equal(indices[ok], ref.indices[ok]), (
        f"{int((indices[ok] != ref.indices[ok]).any(-1).sum())} tokens differ from the fp64 reference"
    )


# ------------------------------------------------------------------------------------------
# codes and indices against the reference

levels_strategy = st.lists(st.integers(2, 7), min_size=1, max_size=4)


@settings(max_examples=30, deadline=None)
@given(
    levels=levels_strategy,
    q=st.integers(1, 4),
    dtype=st.sampled_from(["fp32", "bf16"]),
    spread=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_indices_and_output_match_fp64_reference(levels, q, dtype, spread, seed):
    layer = ResidualFSQ(levels=levels, num_quantizers=q).eval()
    x = randn(3, 24, len(levels), seed=seed, scale=spread).to(DT[dtype])
    out, indices = layer(x)
    assert out.dtype == x.dtype and indices.shape == (3, 24, q)
    ref = reference(x, levels, q)  # on the input values (bf16 upcast exactly)
    assert_indices_match(indices, ref)
    ok = ~ref.near_tie
    atol = 1e-6 if dtype == "fp32" else 1e-2
    torch.testing.assert_close(out[ok].double(), ref.out[ok], atol=atol, rtol=0 if dtype == "fp32" else 1e-2)


@settings(max_examples=15, deadline=None)
@given(
    levels=levels_strategy,
    q=st.integers(1, 3),
    clamp_value=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_tanh_bound_with_soft_clamp_value_matches_reference(levels, q, clamp_value, seed):
    layer = ResidualFSQ(levels=levels, num_quantizers=q, bound_hard_clamp=False,
                        soft_clamp_input_value=clamp_value).eval()
    x = randn(2, 24, len(levels), seed=seed, scale=1.5)
    out, indices = layer(x)
    ref = reference(x, levels, q, hard=False, soft_clamp=clamp_value)
    assert_indices_match(indices, ref)
    ok = ~ref.near_tie
    torch.testing.assert_close(out[ok].double(), ref.out[ok], atol=1e-6, rtol=0)


def test_tanh_bound_without_soft_clamp_and_per_dim_clamp_values():
    levels = [5, 4, 3]
    x = randn(2, 40, 3, seed=3, scale=2.0)
    layer = ResidualFSQ(levels=levels, num_quantizers=3, bound_hard_clamp=False).eval()
    assert_indices_match(layer(x)[1], reference(x, levels, 3, hard=False, soft_clamp=None))
    values = [1.5, 2.0, 0.7]
    layer = ResidualFSQ(levels=levels, num_quantizers=3, bound_hard_clamp=False,
                        soft_clamp_input_value=values).eval()
    assert_indices_match(layer(x)[1], reference(x, levels, 3, hard=False, soft_clamp=values))


@settings(max_examples=30, deadline=None)
@given(levels=levels_strategy, q=st.integers(1, 4), spread=st.floats(0.05, 4.0), seed=st.integers(0, 2**16))
def test_error_bound_of_the_residual_scheme(levels, q, spread, seed):
    """|softclamp(x) - output| <= (L-1)^-q elementwise (no projections)."""
    layer = ResidualFSQ(levels=levels, num_quantizers=q).eval()
    x = randn(2, 64, len(levels), seed=seed, scale=spread)
    out, _ = layer(x)
    ref = reference(x, levels, q)
    bound = (torch.tensor(levels, dtype=F64) - 1) ** (-q)
    err = (ref.softclamped - out.double()).abs()
    assert (err <= bound + 1e-6).all(), f"max error {err.amax((0, 1)).tolist()} > bound {bound.tolist()}"


def test_error_shrinks_as_quantizers_are_added():
    levels = [3, 4, 5, 8]
    steps = torch.tensor(levels, dtype=F64) - 1
    c = 1 + 1 / steps
    # a dense sweep of the whole soft-clamp range, per dimension
    grid = torch.linspace(-1, 1, 4001, dtype=F64)[:, None] * c * 0.999
    x = torch.atanh(grid / c) * c  # softclamp(x) = grid
    x = x.float()[None]
    max_err = []
    for q in range(1, 5):
        out, _ = ResidualFSQ(levels=levels, num_quantizers=q).eval()(x)
        err = (reference(x, levels, q).softclamped - out.double()).abs()[0]
        assert (err <= steps ** (-q) + 1e-6).all()
        max_err.append(err.amax(0))
    for q in range(1, 4):
        assert (max_err[q] < max_err[q - 1]).all(), f"error did not shrink from q={q} to q={q + 1}"
        # the finer bound is met, the coarser was not: each stage really adds resolution
        assert (max_err[q - 1] > steps ** (-q - 1)).all()


def test_scales_are_steps_not_levels():
    """s_k = (L-1)^-k (not vector-quantize-pytorch's L^-k): stage-1 codes span [-1/(L-1), 1/(L-1)]."""
    levels = [5, 3]
    layer = ResidualFSQ(levels=levels, num_quantizers=2).eval()
    x = randn(1, 200, 2, seed=1, scale=2.0)
    _, indices = layer(x)
    codes = layer.get_codes_from_indices(indices)  # (q, b, n, d)
    stage1 = codes[1].abs().amax((0, 1)).double()
    expected = 1 / (torch.tensor(levels, dtype=F64) - 1)
    torch.testing.assert_close(stage1, expected, rtol=1e-6, atol=0)
    ref = reference(x, levels, 2)
    ok = ~ref.near_tie
    torch.testing.assert_close(codes.double()[:, ok], ref.codes[:, ok], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------
# indices -> output, exactly


@pytest.mark.parametrize("channel_first", [False, True], ids=["tokens", "channel_first"])
@pytest.mark.parametrize("dim", [None, 12], ids=["no_proj", "proj"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_get_output_from_indices_is_exact(dtype, dim, channel_first):
    levels, q = [5, 4, 3, 3], 3
    torch.manual_seed(0)
    layer = ResidualFSQ(dim=dim, levels=levels, num_quantizers=q, is_channel_first=channel_first).eval()
    d = dim or len(levels)
    tokens = randn(2, 4, 5, d, seed=1, scale=1.2).to(DT[dtype])  # (b, h, w, d)
    x = tokens.permute(0, 3, 1, 2) if channel_first else tokens.reshape(2, 20, d)
    out, indices = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert indices.shape == ((2, q, 4, 5) if channel_first else (2, 20, q))

    rec = layer.get_output_from_indices(indices, dtype=DT[dtype])
    assert rec.dtype == x.dtype
    assert torch.equal(rec, out), "get_output_from_indices differs from the forward output"
    assert torch.equal(layer.get_output_from_indices(indices).to(DT[dtype]), out)

    # independent check of both against the fp64 reference
    ref = reference_layer(layer, tokens)  # (b, h, w, ...)
    token_indices = indices.permute(0, 2, 3, 1) if channel_first else indices.reshape(2, 4, 5, q)
    assert_indices_match(token_indices, ref)
    token_out = out.permute(0, 2, 3, 1) if channel_first else out.reshape(2, 4, 5, d)
    ok = ~ref.near_tie
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(token_out[ok].double(), ref.projected_out[ok], **tol)


@pytest.mark.parametrize("channel_first", [False, True], ids=["tokens", "channel_first"])
@pytest.mark.parametrize("dim", [None, 12], ids=["no_proj", "proj"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_quantize_dropout_roundtrip_is_exact(dtype, dim, channel_first):
    levels, q = [5, 4, 3], 4
    torch.manual_seed(0)
    layer = ResidualFSQ(dim=dim, levels=levels, num_quantizers=q, quantize_dropout=True,
                        is_channel_first=channel_first).train()
    d = dim or len(levels)
    tokens = randn(2, 3, 5, d, seed=2).to(DT[dtype])
    x = (tokens.permute(0, 3, 1, 2) if channel_first else tokens.reshape(2, 15, d)).requires_grad_(True)
    depths = set()
    for seed in range(8):
        out, indices = layer(x, rand_quantize_dropout_fixed_seed=seed)
        token_indices = indices.permute(0, 2, 3, 1) if channel_first else indices.reshape(2, 3, 5, q)
        kept = int((token_indices[0, 0, 0] >= 0).sum())
        depths.add(kept)
        assert out.dtype == x.dtype
        assert torch.equal(layer.get_output_from_indices(indices, dtype=DT[dtype]), out)
        ref = reference_layer(layer, tokens, kept=kept)
        assert_indices_match(token_indices, ref)  # includes -1 for dropped stages
    assert len(depths) > 1, "quantize dropout never dropped a stage"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dropout"])
def test_return_all_codes(dtype, train):
    levels, q = [5, 4, 3], 4
    layer = ResidualFSQ(levels=levels, num_quantizers=q, quantize_dropout=True).train(train)
    x = randn(2, 10, 3, seed=5, scale=1.3).to(DT[dtype])
    out, indices, all_codes = layer(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1)
    assert all_codes.shape == (q, 2, 10, 3)
    assert all_codes.dtype == x.dtype
    kept = int((indices[0, 0] >= 0).sum())
    if train:
        assert kept < q  # seed 1 drops something (checked so the dropped path is exercised)
    assert (all_codes[kept:] == 0).all()
    total = torch.zeros_like(all_codes[0])
    for stage in all_codes:
        total = total + stage
    if dtype == "fp32":
        assert torch.equal(total, out)
    else:  # each stage rounded to bf16 before summing
        torch.testing.assert_close(total.float(), out.float(), atol=1e-2, rtol=1e-2)
    ref = reference(x, levels, q, kept=kept)
    ok = ~ref.near_tie
    atol = 1e-7 if dtype == "fp32" else 4e-3
    rtol = 1e-2 if dtype == "bf16" else 0
    torch.testing.assert_close(all_codes[:, ok].double(), ref.codes[:, ok], atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------
# quantize dropout


def allowed_kept(q, cutoff, multiple_of):
    return {k for k in range(cutoff + 1, q + 1) if k % multiple_of == 0 or k == q}


@pytest.mark.parametrize("q,cutoff,multiple_of", [(4, 0, 1), (5, 1, 2), (6, 2, 3), (3, 1, 4), (5, 0, 2)])
def test_quantize_dropout_depths(q, cutoff, multiple_of):
    layer = ResidualFSQ(levels=[5, 3], num_quantizers=q, quantize_dropout=True,
                        quantize_dropout_cutoff_index=cutoff, quantize_dropout_multiple_of=multiple_of).train()
    x = randn(2, 6, 2, seed=0).requires_grad_(True)
    allowed = allowed_kept(q, cutoff, multiple_of)

    def kept_of(indices):
        dropped = indices == -1
        # whole-stage decisions, and only a trailing run of stages is dropped
        assert (dropped == dropped[:1, :1]).all(), "dropout differs between tokens"
        pattern = dropped[0, 0].tolist()
        kept = pattern.index(True) if True in pattern else q
        assert pattern == [False] * kept + [True] * (q - kept), f"not a trailing run: {pattern}"
        assert (indices[..., :kept] >= 0).all()
        assert kept in allowed, f"kept {kept} stages, allowed {sorted(allowed)}"
        return kept

    seen = set()
    for seed in range(48):
        _, indices = layer(x, rand_quantize_dropout_fixed_seed=seed)
        kept = kept_of(indices)
        seen.add(kept)
        _, again = layer(x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(again, indices), "a fixed seed must give the same dropout"
    assert seen == allowed, f"depths seen {sorted(seen)}, allowed {sorted(allowed)}"

    seen = set()
    for seed in range(48):  # no fixed seed: drawn from torch's generator
        torch.manual_seed(seed)
        seen.add(kept_of(layer(x)[1]))
    assert seen == allowed


def test_no_quantize_dropout_in_eval_or_no_grad():
    layer = ResidualFSQ(levels=[5, 3], num_quantizers=4, quantize_dropout=True)
    x = randn(2, 6, 2, seed=0).requires_grad_(True)
    layer.eval()
    for seed in range(16):
        assert (layer(x, rand_quantize_dropout_fixed_seed=seed)[1] >= 0).all()
    layer.train()
    with torch.no_grad():
        for seed in range(16):
            assert (layer(x, rand_quantize_dropout_fixed_seed=seed)[1] >= 0).all()
    # the same loop with grad does drop (so the two checks above can fail)
    assert any((layer(x, rand_quantize_dropout_fixed_seed=s)[1] == -1).any() for s in range(16))


@pytest.mark.parametrize("channel_first", [False, True], ids=["tokens", "channel_first"])
def test_coarse_indices_count_missing_quantizers_as_dropped(channel_first):
    levels, q = [5, 4, 3], 4
    layer = ResidualFSQ(levels=levels, num_quantizers=q, quantize_dropout=True,
                        is_channel_first=channel_first).train()
    tokens = randn(2, 8, 3, seed=4)
    x = (tokens.transpose(1, 2) if channel_first else tokens).requires_grad_(True)
    ref_full = reference(tokens, levels, q)
    ok = ~ref_full.near_tie
    kepts = set()
    for seed in range(12):
        out, indices = layer(x, rand_quantize_dropout_fixed_seed=seed)
        stage_axis = 1 if channel_first else -1
        kept = int((indices >= 0).sum(stage_axis).flatten()[0])
        kepts.add(kept)
        coarse = indices.narrow(stage_axis, 0, kept)
        assert torch.equal(layer.get_output_from_indices(coarse), out)
        codes = layer.get_codes_from_indices(coarse)  # (q, b, n, d) in token layout
        assert codes.shape == (q, 2, 8, 3)
        assert (codes[kept:] == 0).all()
        torch.testing.assert_close(codes[:kept, ok].double(), ref_full.codes[:kept, ok], atol=1e-7, rtol=0)
    assert len(kepts) > 1


def test_bad_indices_raise():
    layer = ResidualFSQ(levels=[5, 4], num_quantizers=3).eval()
    good = torch.zeros(2, 5, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        layer.get_codes_from_indices(torch.zeros(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        layer.get_output_from_indices(torch.zeros(2, 5, 4, dtype=torch.long))
    for bad in (layer.codebook_size, -2, layer.codebook_size + 7):
        indices = good.clone()
        indices[1, 2, 1] = bad
        with pytest.raises(ValueError, match="indices"):
            layer.get_codes_from_indices(indices)
        with pytest.raises(ValueError, match="indices"):
            layer.get_output_from_indices(indices)
    # the largest valid index and -1 are fine
    indices = good.clone()
    indices[0, 0] = torch.tensor([layer.codebook_size - 1, -1, -1])
    layer.get_codes_from_indices(indices)


# ------------------------------------------------------------------------------------------
# straight-through gradient


@pytest.mark.parametrize(
    "hard,soft_clamp,dim",
    [(True, None, None), (False, 1.7, None), (False, None, None), (True, None, 10)],
    ids=["hard_clamp", "tanh_softclamp", "tanh_no_softclamp", "hard_clamp_proj"],
)
def test_straight_through_gradient_matches_reference(hard, soft_clamp, dim):
    levels, q = [5, 4, 3], 3
    torch.manual_seed(0)
    kw = {} if hard else dict(bound_hard_clamp=False, soft_clamp_input_value=soft_clamp)
    layer = ResidualFSQ(dim=dim, levels=levels, num_quantizers=q, **kw).train()
    d = dim or len(levels)
    x = randn(2, 30, d, seed=6, scale=1.5).requires_grad_(True)
    w = randn(2, 30, d, seed=7)
    out, _ = layer(x)
    (out * w).sum().backward()

    ref = reference_layer(layer, x, hard=hard, soft_clamp=soft_clamp)
    w64 = w.to(F64)
    if layer.has_projections:
        dz = (w64 @ layer.project_out.weight.detach().to(F64)) * ref.dz
        expected = dz @ layer.project_in.weight.detach().to(F64)
    else:
        expected = w64 * ref.dz
    ok = ~(ref.near_tie | ref.near_edge)
    assert ok.float().mean() > 0.5
    torch.testing.assert_close(x.grad[ok].double(), expected[ok], atol=1e-5, rtol=1e-5)


def test_gradient_skips_dropped_stages():
    levels, q = [5, 4, 3], 4
    layer = ResidualFSQ(levels=levels, num_quantizers=q, quantize_dropout=True).train()
    x = randn(2, 30, 3, seed=8, scale=1.5).requires_grad_(True)
    _, indices = layer(x, rand_quantize_dropout_fixed_seed=1)
    kept = int((indices[0, 0] >= 0).sum())
    assert kept < q
    out, _ = layer(x, rand_quantize_dropout_fixed_seed=1)
    out.sum().backward()
    ref = reference(x, levels, q, kept=kept)
    ok = ~(ref.near_tie | ref.near_edge)
    torch.testing.assert_close(x.grad[ok].double(), ref.dz[ok], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# dtype matrix


def _proj_layer():
    return ResidualFSQ(dim=16, levels=[5, 5, 5], num_quantizers=3)


def _proj_input(dtype):
    return randn(2, 8, 16, seed=11).to(dtype)


NO_PROJ_LEVELS = [5, 4, 3]


def _no_proj_layer():
    return ResidualFSQ(levels=NO_PROJ_LEVELS, num_quantizers=3)


def _no_proj_input(dtype):
    return randn(2, 16, 3, seed=12, scale=1.3).to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    res = run_cell(cell, _proj_layer, _proj_input)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 8, 3)
    assert res.parts.output.shape == (2, 8, 16)
    assert ((indices >= 0) & (indices < 125)).all()

    # without projections the module dtype plays no part: indices are those of fp32 on the values
    res = run_cell(cell, _no_proj_layer, _no_proj_input)
    ref = reference(res.x, NO_PROJ_LEVELS, 3)
    assert_indices_match(res.parts.indices[0], ref)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_return_all_codes(cell):
    res = run_cell(cell, _proj_layer, _proj_input, forward=lambda layer, x: layer(x, return_all_codes=True))
    (all_codes,) = res.parts.others
    assert all_codes.shape == (3, 2, 8, 3)
    assert res.parts.indices[0].shape == (2, 8, 3)


def _grouped_layer():
    return GroupedResidualFSQ(dim=16, groups=2, levels=[5, 4, 3], num_quantizers=3, quantize_dropout=True)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_grouped(cell):
    res = run_cell(cell, _grouped_layer, _proj_input)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 2, 8, 3)
    assert res.parts.output.shape == (2, 8, 16)


# ------------------------------------------------------------------------------------------
# GroupedResidualFSQ


@pytest.mark.parametrize("dim", [6, 16], ids=["no_proj", "proj"])
def test_grouped_equals_per_group_residual_fsq(dim):
    levels, q, groups = [5, 4, 3], 3, 2
    torch.manual_seed(0)
    grouped = GroupedResidualFSQ(dim=dim, groups=groups, levels=levels, num_quantizers=q).eval()
    x = randn(2, 12, dim, seed=13, scale=1.2)
    out, indices = grouped(x)
    assert out.shape == x.shape and indices.shape == (groups, 2, 12, q)
    assert torch.equal(grouped.get_output_from_indices(indices), out)
    for g, chunk in enumerate(x.chunk(groups, dim=-1)):
        single = ResidualFSQ(dim=dim // groups, levels=levels, num_quantizers=q).eval()
        single.load_state_dict(grouped.rvqs[g].state_dict())
        single_out, single_indices = single(chunk)
        sl = slice(g * dim // groups, (g + 1) * dim // groups)
        assert torch.equal(out[..., sl], single_out)
        assert torch.equal(indices[g], single_indices)
        ref = reference_layer(grouped.rvqs[g], chunk)
        assert_indices_match(indices[g], ref)
        ok = ~ref.near_tie
        torch.testing.assert_close(out[..., sl][ok].double(), ref.projected_out[ok], atol=1e-5, rtol=1e-5)


def test_grouped_accept_image_fmap():
    levels, q, groups = [5, 4], 3, 2
    torch.manual_seed(0)
    grouped = GroupedResidualFSQ(dim=4, groups=groups, levels=levels, num_quantizers=q,
                                 accept_image_fmap=True).eval()
    x = randn(2, 4, 3, 5, seed=14)  # (b, d, h, w)
    out, indices = grouped(x)
    assert out.shape == x.shape
    # each group is a channel-first ResidualFSQ: indices (b, q, h, w) per group
    assert indices.shape == (groups, 2, q, 3, 5)
    assert torch.equal(grouped.get_output_from_indices(indices), out)
    tokens = x.permute(0, 2, 3, 1)  # (b, h, w, d)
    for g in range(groups):
        ref = reference(tokens[..., 2 * g:2 * g + 2], levels, q)
        assert_indices_match(indices[g].permute(0, 2, 3, 1), ref)
        ok = ~ref.near_tie
        torch.testing.assert_close(out.permute(0, 2, 3, 1)[..., 2 * g:2 * g + 2][ok].double(),
                                   ref.out[ok], atol=1e-6, rtol=0)


def test_grouped_return_all_codes():
    grouped = GroupedResidualFSQ(dim=6, groups=2, levels=[5, 4, 3], num_quantizers=3).eval()
    x = randn(2, 7, 6, seed=15)
    out, indices, all_codes = grouped(x, return_all_codes=True)
    assert all_codes.shape == (2, 3, 2, 7, 3)
    summed = torch.cat([all_codes[g][0] + all_codes[g][1] + all_codes[g][2] for g in range(2)], dim=-1)
    assert torch.equal(summed, out)


def test_grouped_quantize_dropout_same_depth_for_all_groups():
    grouped = GroupedResidualFSQ(dim=12, groups=3, levels=[5, 3], num_quantizers=5, quantize_dropout=True).train()
    x = randn(2, 6, 12, seed=16).requires_grad_(True)
    depths = set()
    for seed in range(24):
        torch.manual_seed(seed)
        out, indices = grouped(x)
        dropped = (indices == -1).sum(-1)  # (g, b, n)
        assert (dropped == dropped[0, 0, 0]).all(), f"groups dropped different stages: {dropped[:, 0, 0]}"
        depths.add(int(dropped[0, 0, 0]))
        assert torch.equal(grouped.get_output_from_indices(indices), out)
    assert len(depths) >= 3, f"dropout depths seen: {depths}"


@pytest.mark.parametrize("groups", [5, 0, -2, 2.0])
def test_grouped_bad_groups_raise(groups):
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ(dim=8, groups=groups, levels=[5, 4], num_quantizers=2)


def test_grouped_wrong_dim_raises():
    grouped = GroupedResidualFSQ(dim=8, groups=2, levels=[5, 4], num_quantizers=2)
    with pytest.raises(ValueError, match="dim"):
        grouped(torch.randn(2, 5, 6))


# ------------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(levels=[5, 1], num_quantizers=2), "levels"),
        (dict(levels=[5, 0], num_quantizers=2), "levels"),
        (dict(levels=[5, 2.5], num_quantizers=2), "levels"),
        (dict(levels=[], num_quantizers=2), "levels"),
        (dict(levels=[5, 4], num_quantizers=0), "num_quantizers"),
        (dict(levels=[5, 4], num_quantizers=3, quantize_dropout=True, quantize_dropout_cutoff_index=3),
         "quantize_dropout_cutoff_index"),
        (dict(levels=[5, 4], num_quantizers=3, quantize_dropout_cutoff_index=5), "quantize_dropout_cutoff_index"),
        (dict(levels=[5, 4], num_quantizers=3, preserve_symmetry=False), "preserve_symmetry"),
        (dict(levels=[5, 4], num_quantizers=3, soft_clamp_input_value=1.5), "soft_clamp_input_value"),
    ],
    ids=["level_1", "level_0", "level_float", "levels_empty", "num_quantizers_0", "cutoff_eq_q",
         "cutoff_gt_q", "preserve_symmetry_false", "soft_clamp_with_hard_clamp"],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ResidualFSQ(**kwargs)


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("dim", [None, 16])
def test_wrong_input_feature_dim_raises(dim, channel_first):
    layer = ResidualFSQ(dim=dim, levels=[5, 4, 3], num_quantizers=2, is_channel_first=channel_first)
    bad = 7
    x = torch.randn(2, bad, 4, 4) if channel_first else torch.randn(2, 5, bad)
    with pytest.raises(ValueError, match="dim"):
        layer(x)


@pytest.mark.parametrize("shape", [(2, 0, 12), (0, 5, 12), (3, 12)], ids=["n0", "b0", "2d"])
def test_empty_and_2d_inputs(shape):
    layer = ResidualFSQ(dim=12, levels=[5, 4, 3], num_quantizers=3).eval()
    x = randn(*shape, seed=22)
    out, indices = layer(x)
    assert out.shape == x.shape and indices.shape == (*shape[:-1], 3)
    assert torch.equal(layer.get_output_from_indices(indices), out)
    if x.numel():
        assert_indices_match(indices, reference_layer(layer, x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ResidualFSQ(dim=0, levels=[5, 4, 3], num_quantizers=2),
        lambda: ResidualFSQ(dim=-3, levels=[5, 4, 3], num_quantizers=2),
        lambda: ResidualFSQ(dim=2.5, levels=[5, 4, 3], num_quantizers=2),
        lambda: GroupedResidualFSQ(dim=0, groups=1, levels=[5, 4, 3], num_quantizers=2),
    ],
    ids=["dim_0", "dim_negative", "dim_float", "grouped_dim_0"],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_bad_dim_raises_naming_dim(make):
    with pytest.raises((ValueError, TypeError), match=r"\bdim\b"):
        make()


def test_grouped_bool_groups_raises():
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ(dim=8, groups=True, levels=[5, 4], num_quantizers=2)


@pytest.mark.parametrize("channel_first", [False, True])
def test_one_dimensional_input_raises_value_error(channel_first):
    layer = ResidualFSQ(levels=[5, 4, 3], num_quantizers=2, is_channel_first=channel_first)
    with pytest.raises(ValueError):
        layer(torch.randn(3))


def test_numpy_integer_levels_are_accepted():
    np = pytest.importorskip("numpy")
    layer = ResidualFSQ(levels=[np.int64(5), np.int64(4)], num_quantizers=2).eval()
    assert layer.levels == [5, 4]
    x = randn(2, 10, 2, seed=24)
    assert_indices_match(layer(x)[1], reference(x, [5, 4], 2))


def test_levels_given_as_float_integers_or_tuple_are_accepted():
    a = ResidualFSQ(levels=(5.0, 4), num_quantizers=2).eval()
    assert a.levels == [5, 4] and a.codebook_size == 20
    x = randn(2, 10, 2, seed=17)
    assert_indices_match(a(x)[1], reference(x, [5, 4], 2))


# ------------------------------------------------------------------------------------------
# state dict, code usage


def test_state_dict_round_trip_with_projections():
    torch.manual_seed(0)
    a = ResidualFSQ(dim=12, levels=[5, 4, 3], num_quantizers=3).eval()
    torch.manual_seed(1)
    b = ResidualFSQ(dim=12, levels=[5, 4, 3], num_quantizers=3).eval()
    x = randn(2, 10, 12, seed=18)
    out_a, idx_a = a(x)
    assert not torch.equal(b(x)[0], out_a)  # a fresh instance really differs
    b.load_state_dict(a.state_dict())
    out_b, idx_b = b(x)
    assert torch.equal(out_a, out_b) and torch.equal(idx_a, idx_b)
    assert torch.equal(b.get_output_from_indices(idx_a), out_a)


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_code_usage_matches_brute_force(channel_first, dropout):
    levels, q = [3, 3], 4
    layer = ResidualFSQ(levels=levels, num_quantizers=q, is_channel_first=channel_first,
                        quantize_dropout=dropout).train(dropout)
    x = randn(2, 2, 6, 5, seed=19) if channel_first else randn(2, 30, 2, seed=19)
    x.requires_grad_(True)
    _, indices = layer(x, rand_quantize_dropout_fixed_seed=1)  # seed 1 drops stages
    if dropout:
        assert (indices == -1).any()
    usage = layer.code_usage(indices)
    for field in (usage.perplexity, usage.usage, usage.codes_used):
        assert field.shape == (q,)
    for k in range(q):
        stage = indices[:, k] if channel_first else indices[..., k]
        ppl, frac, used = brute_force_usage(stage, layer.codebook_size)
        assert math.isclose(float(usage.perplexity[k]), ppl, rel_tol=1e-5), (k, usage.perplexity, ppl)
        assert math.isclose(float(usage.usage[k]), frac, rel_tol=1e-6)
        assert int(usage.codes_used[k]) == used


# ------------------------------------------------------------------------------------------
# drop-in for vector-quantize-pytorch


@pytest.mark.parametrize(
    "kwargs,shape,return_all_codes,train",
    [
        (dict(levels=[5, 4, 3], num_quantizers=3), (2, 7, 3), False, False),
        (dict(levels=[5, 4, 3], num_quantizers=3, dim=16), (2, 7, 16), True, False),
        (dict(levels=[5, 4, 3], num_quantizers=4, dim=16, quantize_dropout=True,
              quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2), (2, 7, 16), True, True),
        (dict(levels=[5, 4, 3], num_quantizers=2, dim=8, is_channel_first=True), (2, 8, 3, 4), False, False),
        (dict(levels=[5, 4, 3], num_quantizers=3, dim=16, bound_hard_clamp=False,
              soft_clamp_input_value=1.5), (2, 7, 16), True, True),
        (dict(levels=[5, 4, 3], num_quantizers=3, bound_hard_clamp=False,
              soft_clamp_input_value=[1.5, 2.0, 1.2]), (2, 7, 3), False, False),
    ],
    ids=["plain", "proj_all_codes", "dropout", "channel_first", "softclamp_value", "softclamp_list"],
)
def test_drop_in_for_vector_quantize_pytorch(kwargs, shape, return_all_codes, train):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    x = randn(*shape, seed=20)
    ours = ResidualFSQ(**kwargs).train(train)
    peer = peer_module.ResidualFSQ(**kwargs).train(train)
    ours_out = ours(x, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=3)
    peer_out = peer(x, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=3)
    assert call_structure(ours_out) == call_structure(peer_out)
    assert ours.codebook_size == peer.codebook_size
    assert ours.codebooks.shape == peer.codebooks.shape
    # the peer's int32 indices are accepted by ours
    assert torch.equal(ours.get_output_from_indices(ours_out[1].int()), ours_out[0])


def test_loads_vector_quantize_pytorch_state_dict():
    """The peer's state dict loads (strict) and its weights are used; with stage_scales='vq_layers'
    the stages keep our scales (tests/test_peer_checkpoints.py: without it, the peer's)."""
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=12, levels=[5, 4, 3], num_quantizers=3)
    peer = peer_module.ResidualFSQ(**kwargs)
    ours = ResidualFSQ(**kwargs, stage_scales="vq_layers").eval()
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 9, 12, seed=23)
    out, indices = ours(x)
    ref = reference_layer(peer, x)  # the peer's weights, our formulas
    assert_indices_match(indices, ref)


def test_grouped_drop_in_for_vector_quantize_pytorch():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=16, groups=2, levels=[5, 4, 3], num_quantizers=3)
    x = randn(2, 7, 16, seed=21)
    ours, peer = GroupedResidualFSQ(**kwargs).eval(), peer_module.GroupedResidualFSQ(**kwargs).eval()
    for all_codes in (False, True):
        ours_out, peer_out = ours(x, return_all_codes=all_codes), peer(x, return_all_codes=all_codes)
        assert len(ours_out) == len(peer_out)
        assert call_structure(ours_out[:2]) == call_structure(peer_out[:2])
    assert ours.codebook_size == peer.codebook_size
