"""ResidualVQ and GroupedResidualVQ over the dtype matrix (dtype_matrix.py), state dict round
trips after training and in half precision, and code_usage against brute-force counting."""

from __future__ import annotations

import random

import pytest
import torch

from dtype_matrix import DTYPES, Parts, dtype_matrix, run_cell
from reference import assert_stage_usage, close, randn
from rvq_reference import assert_indices_match, reference_layer
from vq_layers import GroupedResidualVQ, ResidualVQ

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# dtype matrix and state dict


def unpack_residual(result) -> Parts:
    """(output, indices, losses (q,) or (g, q)[, all codes]): the loss vector is the losses."""
    out, indices, losses, *rest = result
    return Parts(out, indices=[indices], losses=[losses], others=list(rest))


def _proj_layer():
    return ResidualVQ(dim=16, codebook_dim=4, num_quantizers=3, codebook_size=16)


def _proj_input(dtype):
    return randn(2, 8, 16, seed=44).to(dtype)


def _no_proj_layer():
    return ResidualVQ(dim=4, num_quantizers=3, codebook_size=16)


def _no_proj_input(dtype):
    return randn(2, 16, 4, seed=45, scale=0.3).to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    res = run_cell(cell, _proj_layer, _proj_input, unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 8, 3) and ((indices >= 0) & (indices < 16)).all()
    assert res.parts.output.shape == (2, 8, 16)
    assert res.parts.losses[0].shape == (3,)

    # state dict round trip: a fresh module of the same dtype loads it and gives the same eval outputs
    fresh = _proj_layer().to(device=cell.device, dtype=DTYPES[cell.module_dtype])
    fresh.load_state_dict(res.layer.state_dict())
    res.layer.eval(), fresh.eval()
    x = res.x.detach()
    with cell.autocast_context():
        a, b = res.layer(x), fresh(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # without projections the codes depend on the input values only; in training the step searched
    # the codebooks run_cell's layer started from (seed 0)
    res = run_cell(cell, _no_proj_layer, _no_proj_input, unpack=unpack_residual)
    torch.manual_seed(0)
    start = _no_proj_layer()
    ref = reference_layer(start, res.x.detach().float().cpu())
    ok = assert_indices_match(res.parts.indices[0].cpu(), ref)
    tol = dict(rtol=1e-6, atol=1e-6) if cell.input_dtype == "fp32" else dict(rtol=1e-2, atol=1e-3)
    close(res.parts.output.float().cpu()[ok], ref.out[ok], **tol)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_quantize_dropout_image_all_codes(cell):
    res = run_cell(cell, lambda: ResidualVQ(dim=16, codebook_dim=4, num_quantizers=3, codebook_size=16,
                                            quantize_dropout=True, accept_image_fmap=True),
                   lambda dtype: randn(2, 16, 3, 4, seed=46).to(dtype),
                   forward=lambda layer, x: layer(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1),
                   unpack=unpack_residual)
    (all_codes,) = res.parts.others
    (indices,) = res.parts.indices
    assert all_codes.shape == (3, 2, 3, 4, 4)
    assert indices.shape == (2, 3, 4, 3) and res.parts.output.shape == (2, 16, 3, 4)
    kept = random.Random(1).randrange(0, 3) + 1 if cell.train else 3
    assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
    assert (all_codes[kept:] == 0).all()


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_grouped(cell):
    res = run_cell(cell, lambda: GroupedResidualVQ(dim=16, groups=2, codebook_dim=4, num_quantizers=3,
                                                   codebook_size=16, quantize_dropout=True),
                   _proj_input, unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 2, 8, 3)
    assert res.parts.losses[0].shape == (2, 3)
    assert res.parts.output.shape == (2, 8, 16)


@pytest.mark.parametrize("shared", [False, True])
def test_state_dict_round_trip_after_training(shared):
    torch.manual_seed(0)
    a = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared,
                   kmeans_init=True, threshold_ema_dead_code=1).train()
    for step in range(2):
        a(randn(2, 10, 12, seed=47 + step).requires_grad_(True))
    torch.manual_seed(1)
    b = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared,
                   kmeans_init=True, threshold_ema_dead_code=1)
    b.load_state_dict(a.state_dict())
    if shared:
        assert all(layer._codebook is b.layers[0]._codebook for layer in b.layers)
    a.eval(), b.eval()
    x = randn(2, 10, 12, seed=49)
    out_a, idx_a, _ = a(x)
    out_b, idx_b, _ = b(x)
    assert torch.equal(out_a, out_b) and torch.equal(idx_a, idx_b)
    assert torch.equal(b.get_output_from_indices(idx_a), out_a)
    assert all(bool(layer._codebook.initted) for layer in b.layers)
    # half precision: the statistics stay fp32 and load all the same
    half = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared).half()
    half.load_state_dict(a.state_dict())
    assert all(layer._codebook.embed.dtype == torch.float32 for layer in half.layers)
    out_half, _, _ = half.eval()(x.half())
    assert out_half.dtype == torch.float16 and torch.isfinite(out_half).all()
    assert half.project_in.weight.dtype == torch.float16


@pytest.mark.parametrize("dropout", [False, True])
def test_code_usage_matches_brute_force(dropout):
    q = 3
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=q, codebook_size=8, quantize_dropout=dropout).train(dropout)
    x = randn(2, 20, 4, seed=50).requires_grad_(dropout)
    _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=1)
    if dropout:
        assert (indices == -1).any()
    assert indices.shape[-1] == q
    assert_stage_usage(rvq, indices)
