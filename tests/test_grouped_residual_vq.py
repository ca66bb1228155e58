"""GroupedResidualVQ: each group a ResidualVQ on its slice of the features, against the fp64
reference (rvq_reference.py) and vector-quantize-pytorch."""

from __future__ import annotations

import copy

import pytest
import torch

from reference import close, linear64, randn
from rvq_reference import (
    assert_indices_match,
    books64,
    reference_layer,
    seeded_training_steps,
    teacher_forced_ce64,
)
from vq_layers import GroupedResidualVQ, ResidualVQ

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# GroupedResidualVQ


@pytest.mark.parametrize("dim", [8, 16], ids=["no_proj", "proj"])
def test_grouped_equals_per_group_residual_vq(dim):
    q, groups = 3, 2
    kwargs = dict(codebook_dim=4, num_quantizers=q, codebook_size=16, decay=0.8)
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=dim, groups=groups, **kwargs)
    singles = []
    for g in range(groups):
        single = ResidualVQ(dim=dim // groups, **kwargs)
        single.load_state_dict(grouped.rvqs[g].state_dict())
        singles.append(single)
    x = randn(2, 12, dim, seed=51)
    for train in (False, True):
        grouped.train(train)
        xg = x.clone().requires_grad_(train)
        out, indices, losses, all_codes = grouped(xg, return_all_codes=True)
        assert out.shape == x.shape and indices.shape == (groups, 2, 12, q)
        assert losses.shape == (groups, q) and all_codes.shape == (groups, q, 2, 12, 4)
        for g, chunk in enumerate(x.clone().requires_grad_(train).chunk(groups, dim=-1)):
            single_ref = copy.deepcopy(singles[g]).eval() if train else singles[g]
            s_out, s_idx, s_losses, s_codes = singles[g].train(train)(chunk, return_all_codes=True)
            sl = slice(g * dim // groups, (g + 1) * dim // groups)
            assert torch.equal(out[..., sl], s_out) and torch.equal(indices[g], s_idx)
            close(losses[g], s_losses, rtol=1e-6, atol=0)
            assert torch.equal(all_codes[g], s_codes)
            ref = reference_layer(single_ref, chunk)
            assert_indices_match(indices[g], ref)
        if not train:
            assert torch.equal(grouped.get_output_from_indices(indices), out)
            assert torch.equal(grouped.get_codes_from_indices(indices), all_codes)
    for g in range(groups):  # the training step updated each group as its own ResidualVQ
        single_state = singles[g].state_dict()
        for name, buf in grouped.rvqs[g].state_dict().items():
            close(buf.float(), single_state[name].float(), rtol=1e-6, atol=1e-7, msg=name)


def test_grouped_accept_image_fmap():
    q, groups = 2, 2
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=8, groups=groups, codebook_dim=3, num_quantizers=q, codebook_size=16,
                                accept_image_fmap=True).eval()
    x = randn(2, 8, 3, 5, seed=52)  # (b, d, h, w)
    mask = randn(2, 3, 5, seed=53) > 0
    out, indices, losses = grouped(x)
    assert out.shape == x.shape and indices.shape == (groups, 2, 3, 5, q) and losses.shape == (groups, q)
    assert torch.equal(grouped.get_output_from_indices(indices), out)
    tokens = x.permute(0, 2, 3, 1)
    for g in range(groups):
        rvq = grouped.rvqs[g]
        ref = reference_layer(rvq, tokens[..., 4 * g:4 * g + 4])
        ok = assert_indices_match(indices[g], ref)
        close(out.permute(0, 2, 3, 1)[..., 4 * g:4 * g + 4][ok], ref.projected_out[ok], rtol=1e-5, atol=1e-5)
    out, indices, _ = grouped(x, mask=mask)
    assert (indices[:, ~mask] == -1).all() and (out.permute(0, 2, 3, 1)[~mask] == 0).all()


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_grouped_forward_with_indices_returns_summed_cross_entropy(masked):
    q, groups, k = 3, 2, 8
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=10, groups=groups, codebook_dim=3, num_quantizers=q, codebook_size=k).eval()
    x = randn(2, 9, 10, seed=54)
    given_indices = torch.randint(0, k, (groups, 2, 9, q), generator=torch.Generator().manual_seed(55))
    keep = randn(2, 9, seed=56) > -0.3 if masked else None
    out, ce = grouped(x, indices=given_indices, mask=keep)
    assert ce.shape == () and ce.dtype == torch.float32
    expected = sum(
        teacher_forced_ce64(linear64(rvq.project_in, chunk), books64(rvq), given_indices[g], keep)
        for g, (rvq, chunk) in enumerate(zip(grouped.rvqs, x.chunk(groups, dim=-1))))
    close(ce, expected, rtol=1e-5, atol=1e-6)
    decoded = grouped.get_output_from_indices(given_indices)
    kept = torch.ones(2, 9, dtype=torch.bool) if keep is None else keep
    assert torch.equal(out[kept], decoded[kept]) and (out[~kept] == 0).all()
    with pytest.raises(ValueError, match="indices"):
        grouped(x, indices=given_indices[:1])


def test_grouped_quantize_dropout_same_depth_for_all_groups():
    grouped = GroupedResidualVQ(dim=12, groups=3, num_quantizers=5, codebook_size=8, quantize_dropout=True).train()
    x = randn(2, 6, 12, seed=57).requires_grad_(True)
    depths = set()
    for _, before, (out, indices, losses) in seeded_training_steps(grouped, x, range(16)):
        dropped = (indices == -1).sum(-1)  # (g, b, n)
        assert (dropped == dropped[0, 0, 0]).all(), f"groups dropped different stages: {dropped[:, 0, 0]}"
        kept = 5 - int(dropped[0, 0, 0])
        depths.add(kept)
        assert (losses[:, kept:] == 0).all() and (losses[:, :kept] > 0).all()
        assert torch.equal(before.get_output_from_indices(indices), out)  # the pre-step codes exactly
    assert len(depths) >= 3, depths


@pytest.mark.parametrize("groups", [3, 0, -2, 2.0, True])
def test_grouped_bad_groups_raise(groups):
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualVQ(dim=8, groups=groups, num_quantizers=2, codebook_size=8)


def test_grouped_bad_input_raises():
    grouped = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="dim"):
        grouped(randn(2, 5, 6))
    with pytest.raises(ValueError, match="groups=2"):
        grouped.get_output_from_indices(torch.zeros(1, 2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        grouped(randn(2, 5, 8), mask=torch.ones(2, 6, dtype=torch.bool))
