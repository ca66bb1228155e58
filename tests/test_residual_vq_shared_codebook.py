"""ResidualVQ(shared_codebook=True): one codebook for every stage, searched as it was before the
step and updated once from all the stages' vectors, against the fp64 reference (rvq_reference.py);
the in-place codebook optimizer and affine_param through the shared codebook."""

from __future__ import annotations

import copy

import pytest
import torch

from reference import close, randn
from rvq_reference import (
    assert_buffers_equal,
    assert_indices_match,
    codebook_state,
    ema64,
    reference,
    reference_layer,
    set_codebooks,
)
from vq_layers import ResidualVQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# EMA codebook shared by all stages


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_shared_codebook_step_searches_pre_step_codebook_and_updates_once(masked):
    q, k, d, decay, eps = 3, 16, 4, 0.8, 1e-5
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, shared_codebook=True, decay=decay, eps=eps).train()
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    set_codebooks(rvq, seed=14, scale=0.8)
    saved = copy.deepcopy(rvq)
    book = saved.layers[0].codebook.detach().to(F64).clone()
    x = randn(2, 20, d, seed=15).requires_grad_(True)
    keep = randn(2, 20, seed=16) > -0.5 if masked else torch.ones(2, 20, dtype=torch.bool)
    out, indices, _ = rvq(x, mask=keep if masked else None)

    ref = reference(x, [book] * q)
    assert not ref.near_tie[keep].any(), "choose data without near-ties: the EMA reference depends on every index"
    assert torch.equal(indices[keep], ref.indices[keep]), "a stage searched a codebook changed within the step"
    # the train step's output is what eval on the pre-step codebook gives
    eval_out, eval_indices, _ = saved.eval()(x, mask=keep if masked else None)
    assert torch.equal(out, eval_out) and torch.equal(indices, eval_indices)

    # one EMA step from all the stages' vectors together (not one decay per stage)
    vectors = torch.cat([ref.residuals[s][keep] for s in range(q)])
    idx = torch.cat([ref.indices[..., s][keep] for s in range(q)])
    old = saved.layers[0]._codebook
    cs, ea, embed = ema64(old.cluster_size[0], old.embed_avg[0], vectors, idx, decay, eps)
    new = rvq.layers[0]._codebook
    close(new.cluster_size[0], cs, rtol=1e-6, atol=1e-6)
    close(new.embed_avg[0], ea, rtol=1e-5, atol=1e-6)
    for layer in rvq.layers:
        close(layer.codebook, embed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["diversity", "cross_entropy_commitment"])
def test_shared_codebook_backward_sees_the_codebook_the_step_searched(loss):
    # the losses whose backward recomputes softmax tiles over the codebook: the shared
    # codebook's update after all stages must not leak into them. Reference: the same step
    # with the codebook frozen (no update at all) gives the same losses and input gradients.
    kwargs = dict(codebook_diversity_loss_weight=1.0, codebook_diversity_temperature=1.0, commitment_weight=0.0) \
        if loss == "diversity" else dict(commitment_use_cross_entropy_loss=True)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, shared_codebook=True, decay=0.0, **kwargs).train()
    frozen = copy.deepcopy(rvq)
    x = randn(1, 32, 4, seed=19) * 3
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    _, _, updated_losses = rvq(x1)
    _, _, frozen_losses = frozen(x2, freeze_codebook=True)
    assert not torch.equal(rvq.codebooks, frozen.codebooks)  # the premise: this step moved the codebook
    updated_losses.sum().backward()
    frozen_losses.sum().backward()
    assert torch.equal(updated_losses, frozen_losses)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)


def test_shared_codebook_eval_equals_train_with_frozen_codebook():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=10, codebook_dim=4, num_quantizers=4, codebook_size=16, shared_codebook=True).train()
    x = randn(2, 12, 10, seed=17)
    rvq(x.requires_grad_(True))  # a training step first: a codebook the EMA has moved
    x = randn(2, 12, 10, seed=18)
    saved = codebook_state(rvq)
    frozen_out, frozen_indices, frozen_losses = rvq(x.clone().requires_grad_(True), freeze_codebook=True)
    assert_buffers_equal(rvq, saved)
    eval_out, eval_indices, _ = rvq.eval()(x)
    assert torch.equal(frozen_indices, eval_indices)
    assert torch.equal(frozen_out, eval_out)
    assert frozen_losses.shape == (4,) and (frozen_losses > 0).all()
    ref = reference_layer(rvq, x)
    assert_indices_match(eval_indices, ref)


# ------------------------------------------------------------------------------------------
# VectorQuantize's statistics extras through a shared codebook


@pytest.mark.parametrize("masked", [False, True])
def test_shared_codebook_in_place_optimizer_steps_once_on_every_stages_loss(masked):
    """As vector-quantize-pytorch (manual_in_place_optimizer_update on every stage, one step at
    the end): every stage searches the codebook as it was before the step; one SGD step on the sum
    of the stages' mean((code - sg(residual))^2), against an fp64 reference."""
    lr = 0.5
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=True, learnable_codebook=True,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=lr)).train()
    first = rvq.layers[0]
    assert all(layer.in_place_codebook_optimizer is first.in_place_codebook_optimizer for layer in rvq.layers)
    embed = first._codebook.embed
    codes = embed.detach()[0].to(F64).clone()
    x = randn(2, 7, 4, seed=3)
    keep = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    kept = torch.ones(2, 7, dtype=torch.bool) if keep is None else keep
    residual, grad, path = x.to(F64)[kept], torch.zeros(8, 4, dtype=F64), []
    for _ in range(3):
        idx = torch.cdist(residual, codes).argmin(-1)
        grad.index_add_(0, idx, 2 * (codes[idx] - residual) / residual.numel())
        residual, path = residual - codes[idx], path + [idx]
    _, indices, _ = rvq(x, mask=keep)
    assert torch.equal(indices[kept], torch.stack(path, -1))
    torch.testing.assert_close(embed.detach()[0].to(F64), codes - lr * grad, rtol=1e-5, atol=1e-6)


def test_shared_codebook_with_affine_param_raises():
    with pytest.raises(ValueError, match="affine_param, shared_codebook"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, shared_codebook=True, affine_param=True)
    ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, affine_param=True)  # each stage its own moments
