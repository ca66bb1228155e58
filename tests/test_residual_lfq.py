"""ResidualLFQ and GroupedResidualLFQ against an fp64 re-implementation of the scheme.

The reference (`reference`) is written here from the description (SoundStream's Algorithm 1
with LFQ stages, as vector-quantize-pytorch's ResidualLFQ), not from the code under test:

- z = project_in(x) (fp64 with the layer's weights), residual_0 = z;
- stage k (scale s_k = 2^-k) quantizes residual_k dimension-wise to its sign:
  code_k = +v_k if residual_k > 0 else -v_k, v_k = s_k (spherical: residual normalized, codes
  s_k / sqrt(d)); index_k = sum_i (residual_k,i > 0) 2^(d-1-i);
- residual_{k+1} = residual_k - code_k; output = project_out(sum_k code_k);
- stage k's loss is LFQ's aux loss of residual_k with codes of size v_k: brute-force
  entropies over all 2^d codes of softmax(2 T <residual_k, code>).

A token whose residual comes within 1e-5 of zero in some stage is a genuine near-tie (fp32 and
fp64 may disagree on its sign) and is left out of index checks.
"""

from __future__ import annotations

import inspect
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtype_matrix import Parts, dtype_matrix, run_cell
from reference import assert_stage_usage, call_structure, close, linear64, randn
from vq_layers import GroupedResidualLFQ, ResidualLFQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------
# fp64 reference


def all_codes(d, v):
    k = torch.arange(2**d)[:, None]
    bits = (k >> torch.arange(d - 1, -1, -1)) & 1
    return torch.where(bits.bool(), v, -v).to(F64)


def stage_aux(z, v, T, entropy_loss_weight=0.1, gamma=1.0):
    """LFQ's aux loss (no commitment) of tokens z (N, d) fp64 with codes +-v, by brute force."""
    p = (2 * T * z @ all_codes(z.shape[-1], v).t()).softmax(-1)
    per_sample = -torch.special.xlogy(p, p).sum(-1).mean()
    avg = p.mean(0)
    batch = -torch.special.xlogy(avg, avg).sum(-1)
    return (per_sample - gamma * batch) * entropy_loss_weight


def reference(z, q, *, spherical=False, kept=None, T=100.0, mask=None):
    """fp64 residual LFQ of already-projected tokens z (..., d); stages >= kept are dropped."""
    z = z.detach().to(F64)
    d = z.shape[-1]
    kept = q if kept is None else kept
    weights = 2 ** torch.arange(d - 1, -1, -1)
    residual, out = z, torch.zeros_like(z)
    codes, indices, losses = [], [], []
    margin = torch.full(z.shape[:-1], math.inf, dtype=F64)
    for k in range(q):
        s = 2.0**-k
        if k >= kept:
            codes.append(torch.zeros_like(z))
            indices.append(torch.full(z.shape[:-1], -1, dtype=torch.long))
            losses.append(torch.zeros((), dtype=F64))
            continue
        margin = torch.minimum(margin, residual.abs().amin(-1))
        u = F.normalize(residual, dim=-1) * s if spherical else residual
        v = s / math.sqrt(d) if spherical else s
        bits = u > 0
        code = torch.where(bits, v, -v).to(F64)
        kept_u = u[mask] if mask is not None else u.reshape(-1, d)
        losses.append(stage_aux(kept_u, v, T))
        residual = residual - code
        out = out + code
        codes.append(code)
        indices.append((bits.long() * weights).sum(-1))
    return SimpleNamespace(z=z, out=out, codes=torch.stack(codes), indices=torch.stack(indices, dim=-1),
                           losses=torch.stack(losses), margin=margin)


def reference_layer(layer, x_tokens, **kw):
    z = linear64(layer.project_in, x_tokens) if layer.has_projections else x_tokens.detach().to(F64)
    ref = reference(z, layer.num_quantizers, **kw)
    ref.projected_out = linear64(layer.project_out, ref.out) if layer.has_projections else ref.out
    return ref


def assert_indices_match(indices, ref, margin=1e-5, min_fraction=0.8):
    ok = ref.margin > margin
    assert ok.float().mean() >= min_fraction, "too many near-ties for a meaningful check"
    assert indices.dtype == torch.long
    assert torch.equal(indices[ok], ref.indices[ok]), (
        f"{int((indices[ok] != ref.indices[ok]).any(-1).sum())} tokens differ from the fp64 reference"
    )
    return ok


# ------------------------------------------------------------------------------------------
# indices, output and losses against the reference


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 6),
    q=st.integers(1, 5),
    dtype=st.sampled_from(["fp32", "bf16"]),
    spread=st.floats(0.1, 3.0),
    spherical=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_indices_and_output_match_fp64_reference(d, q, dtype, spread, spherical, seed):
    layer = ResidualLFQ(dim=d, num_quantizers=q, codebook_size=2**d, spherical=spherical).eval()
    x = randn(3, 20, d, seed=seed, scale=spread).to(DT[dtype])
    out, indices, losses = layer(x)
    assert out.dtype == x.dtype and out.shape == x.shape and indices.shape == (3, 20, q)
    assert losses.shape == (q,) and losses.dtype == torch.float32 and (losses == 0).all()
    ref = reference(x, q, spherical=spherical)  # on the input values (bf16 upcasts exactly)
    ok = assert_indices_match(indices, ref, min_fraction=0.5)
    atol = 1e-6 if dtype == "fp32" else 1e-2
    close(out[ok], ref.out[ok], atol=atol, rtol=0 if dtype == "fp32" else 1e-2)


@pytest.mark.parametrize("dim", [5, 16], ids=["no_proj", "proj"])
def test_with_projections_matches_reference(dim):
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=dim, num_quantizers=4, codebook_size=2**5).eval()
    assert layer.has_projections == (dim != 5)
    x = randn(2, 30, dim, seed=1)
    out, indices, _ = layer(x)
    ref = reference_layer(layer, x)
    ok = assert_indices_match(indices, ref, margin=1e-4)
    close(out[ok], ref.projected_out[ok], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 5), q=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_error_bound_of_the_residual_scheme(d, q, seed):
    """|z| <= 2 elementwise -> |z - output| <= 2^-(q-1): each stage halves the interval."""
    layer = ResidualLFQ(dim=d, num_quantizers=q, codebook_size=2**d).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 50, d, generator=g) * 4 - 2
    out, _, _ = layer(x)
    err = (x.to(F64) - out.to(F64)).abs()
    assert (err <= 2.0 ** -(q - 1) + 1e-6).all(), f"max error {err.max()} > {2.0 ** -(q - 1)}"
    if q > 1:  # and the coarser bound is really exceeded by fewer stages
        coarser, _, _ = ResidualLFQ(dim=d, num_quantizers=q - 1, codebook_size=2**d).eval()(x)
        assert (x - coarser).abs().max() > 2.0 ** -(q - 1)


def test_stage_scales_are_powers_of_two():
    layer = ResidualLFQ(dim=4, num_quantizers=4, codebook_size=2**4).eval()
    x = randn(1, 100, 4, seed=2, scale=2.0)
    _, indices, _ = layer(x)
    codes = layer.get_codes_from_indices(indices)  # (q, b, n, d)
    assert codes.shape == (4, 1, 100, 4)
    for k in range(4):
        assert (codes[k].abs() == 2.0**-k).all()
        assert layer.layers[k].codebook_scale == 2.0**-k
    ref = reference(x, 4)
    ok = ref.margin > 1e-5
    assert torch.equal(codes.to(F64)[:, ok], ref.codes[:, ok])


@pytest.mark.parametrize(
    "kwargs,T",
    [(dict(dim=4, codebook_size=2**4), 100.0), (dict(dim=3, codebook_size=2**3), 1.0),
     (dict(dim=4, codebook_size=2**4, spherical=True), 8.0)],
    ids=["hot", "warm", "spherical"],
)
def test_training_losses_per_stage_match_brute_force(kwargs, T):
    q = 3
    layer = ResidualLFQ(num_quantizers=q, **kwargs).train()
    x = randn(2, 25, kwargs["dim"], seed=3, scale=0.8)
    out, indices, losses = layer(x, inv_temperature=T)
    assert losses.shape == (q,) and losses.dtype == torch.float32
    ref = reference(x, q, spherical=kwargs.get("spherical", False), T=T)
    assert (ref.margin > 1e-5).all(), "a near-tie would make the residuals differ"
    assert torch.equal(indices, ref.indices)
    close(losses, ref.losses, rtol=1e-4, atol=1e-5)
    assert (ref.losses.abs() > 1e-3).all()  # every stage has a real loss


def test_soft_clamp_scales_per_stage():
    layer = ResidualLFQ(dim=4, num_quantizers=3, codebook_size=2**4, soft_clamp_input_value=1.5).eval()
    assert [lfq.soft_clamp_input_value for lfq in layer.layers] == [1.5, 0.75, 0.375]
    x = randn(2, 40, 4, seed=4, scale=2.0)
    out, indices, _ = layer(x)
    z = x.to(F64)
    residual, ref_out = z, torch.zeros_like(z)
    for k in range(3):
        c, s = 1.5 * 2.0**-k, 2.0**-k
        clamped = torch.tanh(residual / c) * c
        code = torch.where(clamped > 0, s, -s).to(F64)
        residual, ref_out = residual - code, ref_out + code
    close(out, ref_out, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# indices -> output, exactly


@pytest.mark.parametrize("layout", ["tokens", "image"])
@pytest.mark.parametrize("dim", [4, 12], ids=["no_proj", "proj"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_get_output_from_indices_is_exact(dtype, dim, layout):
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=dim, num_quantizers=3, codebook_size=2**4).eval()
    tokens = randn(2, 4, 5, dim, seed=5).to(DT[dtype])  # (b, h, w, d)
    x = tokens.permute(0, 3, 1, 2) if layout == "image" else tokens.reshape(2, 20, dim)
    out, indices, losses = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert indices.shape == ((2, 4, 5, 3) if layout == "image" else (2, 20, 3))
    assert torch.equal(layer.get_output_from_indices(indices, dtype=x.dtype), out)
    assert torch.equal(layer.get_output_from_indices(indices).to(x.dtype), out)
    ref = reference_layer(layer, tokens.reshape(2, 20, dim))
    assert_indices_match(indices.reshape(2, 20, 3), ref, margin=1e-4)


def test_channel_first_option_on_sequences():
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=8, num_quantizers=2, codebook_size=2**4, channel_first=True).eval()
    x = randn(2, 8, 7, seed=6)  # (b, d, n)
    out, indices, _ = layer(x)
    assert out.shape == x.shape and indices.shape == (2, 7, 2)
    assert torch.equal(layer.get_output_from_indices(indices), out)
    tokens_layer = ResidualLFQ(dim=8, num_quantizers=2, codebook_size=2**4).eval()
    tokens_layer.load_state_dict(layer.state_dict())
    t_out, t_indices, _ = tokens_layer(x.transpose(1, 2))
    assert torch.equal(t_indices, indices) and torch.equal(t_out.transpose(1, 2), out)


@pytest.mark.parametrize("dim,spherical", [(4, False), (12, False), (4, True)], ids=["no_proj", "proj", "spherical"])
def test_train_quantize_dropout_round_trip_is_exact(dim, spherical):
    q = 5
    layer = ResidualLFQ(dim=dim, num_quantizers=q, codebook_size=2**4, quantize_dropout=True,
                        spherical=spherical).train()
    x = randn(2, 9, dim, seed=7).requires_grad_(True)
    seen = set()
    for seed in range(12):
        out, indices, losses = layer(x, rand_quantize_dropout_fixed_seed=seed)
        last = random.Random(seed).randrange(0, q)  # SoundStream: uniform depth, as the peer draws it
        kept = last + 1
        seen.add(kept)
        assert (indices[..., kept:] == -1).all() and (indices[..., :kept] >= 0).all()
        assert (losses[kept:] == 0).all() and (losses[:kept] != 0).all()
        assert torch.equal(layer.get_output_from_indices(indices), out)
        ref = reference_layer(layer, x, kept=kept, spherical=spherical)
        ok = assert_indices_match(indices, ref, margin=1e-4)
        close(out[ok], ref.projected_out[ok], rtol=1e-5, atol=1e-5)
        # coarse indices (only the kept stages) give the same output
        assert torch.equal(layer.get_output_from_indices(indices[..., :kept]), out)
    assert len(seen) >= 3


@pytest.mark.parametrize("cutoff,multiple_of", [(2, 1), (0, 2), (1, 3)])
def test_quantize_dropout_depths(cutoff, multiple_of):
    q = 6
    layer = ResidualLFQ(dim=3, num_quantizers=q, codebook_size=2**3, quantize_dropout=True,
                        quantize_dropout_cutoff_index=cutoff, quantize_dropout_multiple_of=multiple_of).train()
    x = randn(1, 4, 3, seed=8).requires_grad_(True)
    for seed in range(10):
        _, indices, _ = layer(x, rand_quantize_dropout_fixed_seed=seed)
        last = random.Random(seed).randrange(cutoff, q)
        if multiple_of != 1:
            last = math.ceil((last + 1) / multiple_of) * multiple_of - 1
        kept = int((indices[0, 0] >= 0).sum())
        assert kept == min(last + 1, q)
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()


def test_no_quantize_dropout_in_eval_or_without_grad():
    layer = ResidualLFQ(dim=3, num_quantizers=4, codebook_size=2**3, quantize_dropout=True)
    x = randn(1, 4, 3, seed=9)
    for seed in range(6):
        assert (layer.eval()(x, rand_quantize_dropout_fixed_seed=seed)[1] >= 0).all()
        with torch.no_grad():
            assert (layer.train()(x, rand_quantize_dropout_fixed_seed=seed)[1] >= 0).all()


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_return_all_codes(dtype, train):
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=10, num_quantizers=3, codebook_size=2**4).train(train)
    x = randn(2, 7, 10, seed=10).to(DT[dtype]).requires_grad_(train)
    out, indices, losses, codes = layer(x, return_all_codes=True)
    assert codes.shape == (3, 2, 7, 4) and codes.dtype == x.dtype
    assert torch.equal(codes, layer.get_codes_from_indices(indices).to(x.dtype))
    ref = reference_layer(layer, x.detach())
    ok = assert_indices_match(indices, ref, margin=1e-3 if dtype == "bf16" else 1e-4)
    close(codes[:, ok], ref.codes[:, ok], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# masks


def test_mask_passes_to_every_stage():
    layer = ResidualLFQ(dim=4, num_quantizers=3, codebook_size=2**4).train()
    x = randn(3, 15, 4, seed=11)
    mask = randn(3, 15, seed=12) > 0.2
    _, indices, losses = layer(x, mask=mask, inv_temperature=1.0)
    _, sub_indices, sub_losses = layer(x[mask][None], inv_temperature=1.0)
    close(losses, sub_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices[mask], sub_indices[0])
    ref = reference(x, 3, T=1.0, mask=mask)
    close(losses, ref.losses, rtol=1e-4, atol=1e-5)
    unmasked = layer(x, inv_temperature=1.0)[2]
    assert ((unmasked - losses).abs() > 1e-5).all(), "the mask changed no stage's loss"


def test_image_mask_and_all_masked():
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=8, num_quantizers=2, codebook_size=2**4).train()
    x = randn(2, 8, 3, 4, seed=13).requires_grad_(True)
    mask = randn(2, 3, 4, seed=14) > 0
    _, _, losses = layer(x, mask=mask, inv_temperature=1.0)
    _, _, sub_losses = layer(x.permute(0, 2, 3, 1)[mask][None], inv_temperature=1.0)
    close(losses, sub_losses, rtol=1e-5, atol=1e-6)
    out, _, losses = layer(x, mask=torch.zeros(2, 3, 4, dtype=torch.bool))
    assert (losses == 0).all() and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        layer(x, mask=torch.ones(2, 3, 4))


def kept_alone(x, samples, axis=0):
    """x's kept samples along `axis`, selected on the host."""
    return x.index_select(axis, torch.tensor([i for i, keep in enumerate(samples.tolist()) if keep], dtype=torch.long))


@pytest.mark.parametrize("samples", [[True, False, True], [False, False, False]], ids=["tfT", "all_false"])
@pytest.mark.parametrize("shape", [(3, 6, 8), (3, 8, 2, 3), (3, 8)], ids=["sequence", "image", "single_token"])
def test_sample_mask_equals_running_the_kept_samples_alone(shape, samples):
    """A (b,) mask, as the peer's ResidualLFQ passes it to every stage: kept samples as if alone,
    dropped samples -1 in every stage and zeros (the decoding of all -1), no gradient."""
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=8, num_quantizers=3, codebook_size=2**2, entropy_loss_weight=0.3,
                        commitment_loss_weight=0.5).train()  # projections 8 -> 2
    x = randn(*shape, seed=15).requires_grad_()
    samples = torch.tensor(samples)
    out, indices, losses, all_codes = layer(x, mask=samples, inv_temperature=1.0, return_all_codes=True)
    sub_out, sub_indices, sub_losses = layer(kept_alone(x.detach(), samples), inv_temperature=1.0)
    close(losses, sub_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept_alone(indices, samples), sub_indices)
    torch.testing.assert_close(kept_alone(out, samples), sub_out, rtol=1e-6, atol=1e-6)
    dropped = ~samples
    assert (indices[dropped] == -1).all() and (out[dropped] == 0).all() and (all_codes[:, dropped] == 0).all()
    (out.square().sum() + losses.sum()).backward()
    assert (x.grad[dropped] == 0).all()
    if not samples.any():
        assert (losses == 0).all()
    layer.eval()
    out, indices, _ = layer(x.detach(), mask=samples)
    assert torch.equal(layer.get_output_from_indices(indices), out)


def test_grouped_sample_mask():
    torch.manual_seed(0)
    grouped = GroupedResidualLFQ(dim=16, groups=2, num_quantizers=2, codebook_size=2**4,
                                 accept_image_fmap=True).train()
    x = randn(3, 16, 2, 3, seed=16)
    samples = torch.tensor([False, True, True])
    out, indices, losses = grouped(x, mask=samples, inv_temperature=1.0)
    sub_out, sub_indices, sub_losses = grouped(kept_alone(x, samples), inv_temperature=1.0)
    close(losses, sub_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept_alone(indices, samples, axis=1), sub_indices)
    torch.testing.assert_close(kept_alone(out, samples), sub_out, rtol=1e-6, atol=1e-6)
    assert (indices[:, 0] == -1).all() and (out[0] == 0).all()
    grouped.eval()
    out, indices, _ = grouped(x, mask=samples)
    assert torch.equal(grouped.get_output_from_indices(indices), out)


def test_bad_sample_mask_raises_naming_the_shapes():
    layer = ResidualLFQ(dim=4, num_quantizers=2, codebook_size=2**4)
    expected = r"mask: expected a bool tensor of shape \(2,\) or \(2, 5\).*got torch.bool \(5,\)"
    with pytest.raises(ValueError, match=expected):
        layer(randn(2, 5, 4, seed=17), mask=torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
# gradients


def test_straight_through_gradient_through_stages():
    """In training the output's gradient w.r.t. z is the identity per kept stage, residuals detached:
    d out / d z = sum over kept stages of d code_k / d residual_k = (number of kept stages) I."""
    layer = ResidualLFQ(dim=4, num_quantizers=3, codebook_size=2**4, quantize_dropout=True).train()
    x = randn(2, 6, 4, seed=15).requires_grad_(True)
    weights = randn(2, 6, 4, seed=16)
    for seed in range(4):
        x.grad = None
        out, indices, _ = layer(x, rand_quantize_dropout_fixed_seed=seed)
        (out * weights).sum().backward()
        kept = int((indices[0, 0] >= 0).sum())
        assert torch.equal(x.grad, weights * kept)


def test_losses_reach_the_input():
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=10, num_quantizers=3, codebook_size=2**4).train()
    x = randn(2, 8, 10, seed=17).requires_grad_(True)
    _, _, losses = layer(x, inv_temperature=1.0)
    losses.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert layer.project_in.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# dtype matrix


def unpack_residual(result) -> Parts:
    """(output, indices, losses (q,) or (g, q)[, all codes]): the loss vector is the losses."""
    out, indices, losses, *rest = result
    return Parts(out, indices=[indices], losses=[losses], others=list(rest))


def _proj_input(dtype):
    return randn(2, 8, 16, seed=18).to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    res = run_cell(cell, lambda: ResidualLFQ(dim=16, num_quantizers=3, codebook_size=2**4), _proj_input,
                   unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 8, 3) and ((indices >= 0) & (indices < 16)).all()
    assert res.parts.output.shape == (2, 8, 16)
    assert res.parts.losses[0].shape == (3,)

    # without projections the codes depend on nothing but the input values
    res = run_cell(cell, lambda: ResidualLFQ(dim=4, num_quantizers=3, codebook_size=2**4),
                   lambda dtype: randn(2, 16, 4, seed=19, scale=1.3).to(dtype), unpack=unpack_residual)
    ref = reference(res.x.float().cpu(), 3)
    ok = assert_indices_match(res.parts.indices[0].cpu(), ref, min_fraction=0.5)
    close(res.parts.output.detach().float().cpu()[ok], ref.out[ok].float(), rtol=0, atol=0)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_image_return_all_codes(cell):
    res = run_cell(cell, lambda: ResidualLFQ(dim=16, num_quantizers=2, codebook_size=2**4, quantize_dropout=True),
                   lambda dtype: randn(2, 16, 3, 4, seed=20).to(dtype),
                   forward=lambda layer, x: layer(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=0),
                   unpack=unpack_residual)
    (all_codes,) = res.parts.others
    assert all_codes.shape == (2, 2, 3, 4, 4)
    assert res.parts.indices[0].shape == (2, 3, 4, 2)
    assert res.parts.output.shape == (2, 16, 3, 4)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_grouped(cell):
    res = run_cell(cell, lambda: GroupedResidualLFQ(dim=16, groups=2, num_quantizers=3, codebook_size=2**4,
                                                    quantize_dropout=True),
                   _proj_input, unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 2, 8, 3)
    assert res.parts.losses[0].shape == (2, 3)
    assert res.parts.output.shape == (2, 8, 16)


# ------------------------------------------------------------------------------------------
# GroupedResidualLFQ


@pytest.mark.parametrize("dim", [8, 24], ids=["no_proj", "proj"])
def test_grouped_equals_per_group_residual_lfq(dim):
    q, groups = 3, 2
    torch.manual_seed(0)
    grouped = GroupedResidualLFQ(dim=dim, groups=groups, num_quantizers=q, codebook_size=2**4).eval()
    x = randn(2, 12, dim, seed=21, scale=1.2)
    out, indices, losses = grouped(x)
    assert out.shape == x.shape and indices.shape == (groups, 2, 12, q) and losses.shape == (groups, q)
    assert torch.equal(grouped.get_output_from_indices(indices), out)
    assert torch.equal(grouped.get_codes_from_indices(indices),
                       torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(grouped.rvqs, indices)]))
    width = dim // groups
    for g, chunk in enumerate(x.chunk(groups, dim=-1)):
        single = ResidualLFQ(dim=width, num_quantizers=q, codebook_size=2**4).eval()
        single.load_state_dict(grouped.rvqs[g].state_dict())
        single_out, single_indices, _ = single(chunk)
        sl = slice(g * width, (g + 1) * width)
        assert torch.equal(out[..., sl], single_out)
        assert torch.equal(indices[g], single_indices)
        ref = reference_layer(grouped.rvqs[g], chunk)
        ok = assert_indices_match(indices[g], ref, margin=1e-4)
        close(out[..., sl][ok], ref.projected_out[ok], atol=1e-5, rtol=1e-5)


def test_grouped_training_losses_per_group():
    grouped = GroupedResidualLFQ(dim=8, groups=2, num_quantizers=2, codebook_size=2**4).train()
    x = randn(2, 15, 8, seed=22, scale=0.8)
    _, indices, losses = grouped(x, inv_temperature=1.0)
    assert losses.shape == (2, 2) and losses.dtype == torch.float32
    for g, chunk in enumerate(x.chunk(2, dim=-1)):
        ref = reference(chunk, 2, T=1.0)
        assert (ref.margin > 1e-5).all()
        assert torch.equal(indices[g], ref.indices)
        close(losses[g], ref.losses, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [8, 12], ids=["no_proj", "proj"])
def test_grouped_accept_image_fmap(dim):
    q, groups = 3, 2
    torch.manual_seed(0)
    grouped = GroupedResidualLFQ(dim=dim, groups=groups, num_quantizers=q, codebook_size=2**4,
                                 accept_image_fmap=True).eval()
    x = randn(2, dim, 3, 5, seed=23)  # (b, d, h, w)
    out, indices, losses = grouped(x)
    assert out.shape == x.shape and losses.shape == (groups, q)
    assert indices.shape == (groups, 2, 3, 5, q)  # each group a channel-first ResidualLFQ
    assert torch.equal(grouped.get_output_from_indices(indices), out)
    tokens = x.permute(0, 2, 3, 1)  # (b, h, w, d)
    width = dim // groups
    for g in range(groups):
        ref = reference_layer(grouped.rvqs[g], tokens[..., g * width:(g + 1) * width])
        ok = assert_indices_match(indices[g], ref, margin=1e-4)
        close(out.permute(0, 2, 3, 1)[..., g * width:(g + 1) * width][ok], ref.projected_out[ok],
              atol=1e-5, rtol=1e-5)


def test_grouped_return_all_codes():
    grouped = GroupedResidualLFQ(dim=8, groups=2, num_quantizers=3, codebook_size=2**4).eval()
    x = randn(2, 7, 8, seed=24)
    out, indices, losses, all_codes = grouped(x, return_all_codes=True)
    assert all_codes.shape == (2, 3, 2, 7, 4)
    summed = torch.cat([all_codes[g][0] + all_codes[g][1] + all_codes[g][2] for g in range(2)], dim=-1)
    assert torch.equal(summed, out)


def test_grouped_quantize_dropout_same_depth_for_all_groups_and_round_trip():
    grouped = GroupedResidualLFQ(dim=12, groups=3, num_quantizers=5, codebook_size=2**4,
                                 quantize_dropout=True).train()
    x = randn(2, 6, 12, seed=25).requires_grad_(True)
    depths = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out, indices, losses = grouped(x)
        dropped = (indices == -1).sum(-1)  # (g, b, n)
        assert (dropped == dropped[0, 0, 0]).all(), f"groups dropped different stages: {dropped[:, 0, 0]}"
        k = int(dropped[0, 0, 0])
        depths.add(k)
        if k:
            assert (losses[:, -k:] == 0).all()
        assert torch.equal(grouped.get_output_from_indices(indices), out)
    assert len(depths) >= 3, f"dropout depths seen: {depths}"


@pytest.mark.parametrize("groups", [3, 0, -2, 2.0, True])
def test_grouped_bad_groups_raise(groups):
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualLFQ(dim=8, groups=groups, num_quantizers=2, codebook_size=2**4)


def test_grouped_wrong_dim_raises():
    grouped = GroupedResidualLFQ(dim=8, groups=2, num_quantizers=2, codebook_size=2**4)
    with pytest.raises(ValueError, match="dim"):
        grouped(randn(2, 5, 6))


# ------------------------------------------------------------------------------------------
# configuration and input errors, state, usage


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(dim=8, num_quantizers=2, codebook_size=1000), "1024"),
        (dict(dim=8, num_quantizers=2, codebook_size=1), "codebook_size"),
        (dict(dim=8, num_quantizers=0, codebook_size=16), "num_quantizers"),
        (dict(dim=0, num_quantizers=2, codebook_size=16), "dim"),
        (dict(dim=8, num_quantizers=3, codebook_size=16, quantize_dropout=True, quantize_dropout_cutoff_index=3),
         "quantize_dropout_cutoff_index"),
        (dict(dim=8, num_quantizers=3, codebook_size=16, codebook_scale=0.5), "codebook_scale"),
        (dict(dim=8, num_quantizers=3, codebook_size=16, soft_clamp_input_value=0.5), "soft_clamp_input_value"),
    ],
    ids=["not_pow2", "size_1", "q_0", "dim_0", "cutoff", "codebook_scale", "soft_clamp_below_scale"],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ResidualLFQ(**kwargs)


def test_wrong_input_and_indices_raise():
    layer = ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4)
    with pytest.raises(ValueError, match="dim 12.*got 10"):
        layer(randn(2, 5, 10))
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 10, 3, 3))
    with pytest.raises(ValueError, match="indices"):
        layer.get_output_from_indices(torch.tensor([[[0, 16, 0]]]))
    with pytest.raises(ValueError, match="indices"):
        layer.get_output_from_indices(torch.zeros(1, 2, 4, dtype=torch.long))  # 4 > q stages


@pytest.mark.parametrize("shape", [(2, 0, 12), (3, 12)], ids=["n0", "2d"])
def test_empty_and_2d_inputs(shape):
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4).eval()
    x = randn(*shape, seed=26)
    out, indices, losses = layer(x)
    assert out.shape == x.shape and indices.shape == (*shape[:-1], 3) and losses.shape == (3,)
    assert torch.equal(layer.get_output_from_indices(indices), out)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4, spherical=True).eval()
    torch.manual_seed(1)
    b = ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4, spherical=True).eval()
    x = randn(2, 10, 12, seed=27)
    out_a, idx_a, _ = a(x)
    assert not torch.equal(b(x)[0], out_a)
    b.load_state_dict(a.state_dict())
    out_b, idx_b, _ = b(x)
    assert torch.equal(out_a, out_b) and torch.equal(idx_a, idx_b)
    assert torch.equal(b.get_output_from_indices(idx_a), out_a)
    half = ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4, orthogonal_rotation=True).half()
    half.load_state_dict(ResidualLFQ(dim=12, num_quantizers=3, codebook_size=2**4, orthogonal_rotation=True)
                         .state_dict())
    assert all(lfq.orthogonal_rot.dtype == torch.float32 for lfq in half.layers)
    assert half.project_in.weight.dtype == torch.float16


@pytest.mark.parametrize("train", [False, True])
def test_orthogonal_rotation_get_output_from_indices_round_trip(train):
    torch.manual_seed(0)
    layer = ResidualLFQ(dim=4, num_quantizers=3, codebook_size=2**4, orthogonal_rotation=True).train(train)
    x = randn(2, 10, 4, seed=33).requires_grad_(train)
    out, indices, _, all_codes = layer(x, return_all_codes=True)
    # fp64 reference: stage k rotates the residual, takes signs, rotates the codes back
    residual, expected = x.detach().to(F64), torch.zeros(2, 10, 4, dtype=F64)
    for k, lfq in enumerate(layer.layers):
        rot = lfq.orthogonal_rot.to(F64)
        code = torch.where(residual @ rot > 0, 2.0**-k, -(2.0**-k)).to(F64) @ rot.t()
        residual, expected = residual - code, expected + code
    close(out, expected, rtol=1e-5, atol=1e-6)  # forward is right
    close(all_codes.sum(0), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.get_output_from_indices(indices), out)


def test_codebooks_property():
    layer = ResidualLFQ(dim=3, num_quantizers=3, codebook_size=2**3)
    books = layer.codebooks
    assert books.shape == (3, 8, 3)
    for k in range(3):
        torch.testing.assert_close(books[k].to(F64), all_codes(3, 2.0**-k), rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [False, True])
def test_code_usage_matches_brute_force(dropout):
    q = 4
    layer = ResidualLFQ(dim=3, num_quantizers=q, codebook_size=2**3, quantize_dropout=dropout).train(dropout)
    x = randn(2, 3, 6, 5, seed=28).requires_grad_(True)  # channel-first image
    _, indices, _ = layer(x, rand_quantize_dropout_fixed_seed=1)  # seed 1 drops stages
    if dropout:
        assert (indices == -1).any()
    assert indices.shape[-1] == q
    assert_stage_usage(layer, indices)


# ------------------------------------------------------------------------------------------
# drop-in for vector-quantize-pytorch


@pytest.mark.parametrize(
    "kwargs,shape,return_all_codes,train",
    [
        (dict(dim=4, num_quantizers=3, codebook_size=2**4), (2, 7, 4), False, False),
        (dict(dim=16, num_quantizers=3, codebook_size=2**4), (2, 7, 16), True, False),
        (dict(dim=16, num_quantizers=4, codebook_size=2**4, quantize_dropout=True,
              quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2), (2, 7, 16), True, True),
        (dict(dim=4, num_quantizers=3, codebook_size=2**4, soft_clamp_input_value=1.5, spherical=True,
              entropy_loss_weight=0.2, commitment_loss_weight=0.3, diversity_gamma=2.0), (2, 7, 4), True, True),
    ],
    ids=["plain", "proj_all_codes", "dropout", "lfq_kwargs"],
)
def test_drop_in_for_vector_quantize_pytorch(kwargs, shape, return_all_codes, train):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    x = randn(*shape, seed=29).requires_grad_(train)
    torch.manual_seed(0)
    ours = ResidualLFQ(**kwargs).train(train)
    peer = peer_module.ResidualLFQ(**kwargs).train(train)
    ours.load_state_dict(peer.state_dict())  # strict
    ours_out = ours(x, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=3)
    peer_out = peer(x, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=3)
    assert call_structure(ours_out) == call_structure(peer_out)
    assert torch.equal(ours_out[1], peer_out[1].long())  # same codes, same dropped stages
    torch.testing.assert_close(ours_out[0], peer_out[0], rtol=1e-5, atol=1e-5)
    assert ours.codebooks.shape == peer.codebooks.shape
    if not kwargs.get("spherical"):  # the peer's `codebooks` are not normalized (its forward's codes are)
        torch.testing.assert_close(ours.codebooks, peer.codebooks)
    assert torch.equal(ours.get_output_from_indices(ours_out[1].int()), ours_out[0])


def test_drop_in_keywords():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    for name in ("ResidualLFQ", "GroupedResidualLFQ"):
        ours, peer = {"ResidualLFQ": ResidualLFQ, "GroupedResidualLFQ": GroupedResidualLFQ}[name], getattr(
            peer_module, name)
        for method in ("__init__", "forward", "get_output_from_indices", "get_codes_from_indices"):
            theirs = {p.name for p in inspect.signature(getattr(peer, method)).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            mine = set(inspect.signature(getattr(ours, method)).parameters)
            assert theirs <= mine, f"{name}.{method} lacks {theirs - mine}"


@pytest.mark.parametrize("train", [False, True])
def test_grouped_drop_in_for_vector_quantize_pytorch(train):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=16, groups=2, num_quantizers=3, codebook_size=2**4)
    x = randn(2, 7, 16, seed=30).requires_grad_(train)
    ours = GroupedResidualLFQ(**kwargs).train(train)
    peer = peer_module.GroupedResidualLFQ(**kwargs).train(train)
    ours.load_state_dict(peer.state_dict())  # strict
    for all_codes in (False, True):
        ours_out, peer_out = ours(x, return_all_codes=all_codes), peer(x, return_all_codes=all_codes)
        assert len(ours_out) == len(peer_out)
        assert call_structure(ours_out[:3]) == call_structure(peer_out[:3])
        assert torch.equal(ours_out[1], peer_out[1].long())
        torch.testing.assert_close(ours_out[0], peer_out[0], rtol=1e-5, atol=1e-5)
    assert ours.codebooks.shape == peer.codebooks.shape


@pytest.mark.parametrize("name,value", [("num_codebooks", 2), ("has_projections", True),
                                        ("keep_num_codebooks_dim", True), ("codebook_scale", 0.5)])
def test_stage_keywords_set_by_residual_lfq_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, **{name: value})


def test_grouped_image_fmap_on_channel_first_sequences_and_group_count():
    layer = GroupedResidualLFQ(dim=16, groups=2, accept_image_fmap=True, codebook_size=256, num_quantizers=3).eval()
    x = randn(2, 16, 3, seed=5)
    out, indices, _ = layer(x)
    assert out.shape == x.shape and indices.shape == (2, 2, 3, 3)
    assert torch.equal(layer.get_output_from_indices(indices), out)
    with pytest.raises(ValueError, match="groups=2"):
        layer.get_output_from_indices(indices[:1])
