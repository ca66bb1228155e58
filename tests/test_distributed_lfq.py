"""LFQ in real 2-process gloo groups (see `dist_utils`): the entropies of the global batch,
gradients by the DDP convention, and per-sample masks counting the global kept tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_utils import WORLD, _alone_group, _assert_identical_across_ranks, _batch, run_in_processes
from vq_layers import LFQ

# ------------------------------------------------------------------------------------------
# 3. LFQ under DDP: the entropy of the global batch, gradients by the DDP convention


class _LinearLFQ(nn.Module):
    def __init__(self, group=None):
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                       process_group=group)

    def forward(self, x):
        return self.lfq(self.linear(x), inv_temperature=1.0, return_loss_breakdown=True)


def _lfq_loss(ret, target):
    # mean over this process's tokens: equal-sized rank batches make DDP's average the global mean
    return F.mse_loss(ret.quantized, target) + ret.entropy_aux_loss


def _lfq_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    mine = slice(rank * 2, rank * 2 + 2)
    zs = [_batch(0, r, dim=4) * 0.5 for r in range(world)]
    targets = [_batch(1, r, dim=4) for r in range(world)]

    # the layer alone: entropies of the global batch; input gradient = world x the single slice
    lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25).train()
    single_lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                     process_group=alone).train()
    z = zs[rank].clone().requires_grad_()
    z_all = torch.cat(zs).requires_grad_()
    ret, breakdown = lfq(z, inv_temperature=1.0, return_loss_breakdown=True)
    single_ret, single_breakdown = single_lfq(z_all, inv_temperature=1.0, return_loss_breakdown=True)
    for field in ("per_sample_entropy", "batch_entropy"):
        value, expected = getattr(breakdown, field), getattr(single_breakdown, field)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=lambda m, field=field: f"{field}: {m}")
    assert single_breakdown.batch_entropy > 0.1  # far from a degenerate batch
    _assert_identical_across_ranks({"per_sample": breakdown.per_sample_entropy,
                                    "batch": breakdown.batch_entropy}, "LFQ entropies")
    _lfq_loss(ret, targets[rank]).backward()
    _lfq_loss(single_ret, torch.cat(targets)).backward()
    assert z_all.grad[mine].abs().max() > 0
    torch.testing.assert_close(z.grad, world * z_all.grad[mine], rtol=1e-5, atol=1e-6)
    # the entropy term alone, whose gradient crosses ranks
    z.grad = z_all.grad = None
    lfq.commitment_loss_weight = single_lfq.commitment_loss_weight = 0.0
    lfq(z, inv_temperature=1.0)[2].backward()
    single_lfq(z_all, inv_temperature=1.0)[2].backward()
    torch.testing.assert_close(z.grad, world * z_all.grad[mine], rtol=1e-5, atol=1e-7)

    # under DDP, a Linear before LFQ: its averaged gradient is the single process's
    torch.manual_seed(0)
    model = _LinearLFQ()
    torch.manual_seed(0)
    single = _LinearLFQ(alone)
    ddp = DistributedDataParallel(model)
    xs = [_batch(2, r, dim=5) for r in range(world)]
    ret, breakdown = ddp(xs[rank])
    single_ret, single_breakdown = single(torch.cat(xs))
    torch.testing.assert_close(breakdown.batch_entropy, single_breakdown.batch_entropy, rtol=1e-5, atol=1e-6)
    _lfq_loss(ret, targets[rank]).backward()
    _lfq_loss(single_ret, torch.cat(targets)).backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert q.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(90)
def test_lfq_under_ddp_entropy_and_gradients_equal_single_process():
    run_in_processes(_lfq_worker, WORLD, timeout=60)


# ------------------------------------------------------------------------------------------
# per-sample masks: only the kept samples of every rank count

# per step, per rank: (b, n, which samples are kept) for a (b,) per-sample mask
SAMPLE_MASK_STEPS = [
    ((3, 4, [True, False, True]), (2, 5, [False, True])),
    ((2, 4, [False, False]), (2, 3, [True, True])),  # rank 0 drops every sample
    ((2, 4, [False, False]), (1, 3, [False])),  # nothing kept anywhere
]


def _sample_mask_batch(step: int, rank: int, dim: int = 4):
    """(x, sample mask (b,), x's kept tokens (m, dim)) of `rank` at `step` of SAMPLE_MASK_STEPS."""
    b, n, samples = SAMPLE_MASK_STEPS[step][rank]
    x = torch.randn(b, n, dim, generator=torch.Generator().manual_seed(700 + 10 * step + rank)) * (1 + rank)
    kept = [i for i, keep in enumerate(samples) if keep]
    return x, torch.tensor(samples), x[kept].reshape(-1, dim)


def _lfq_sample_mask_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    torch.manual_seed(0)
    layer = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1).train()
    torch.manual_seed(0)
    single = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, process_group=alone).train()
    for step in range(len(SAMPLE_MASK_STEPS)):
        what = f"step {step}"
        x, samples, _ = _sample_mask_batch(step, rank)
        x.requires_grad_()
        kept = torch.cat([_sample_mask_batch(step, r)[2] for r in range(world)])[None]  # (1, N, dim)
        (out, indices, loss), breakdown = layer(x, mask=samples, inv_temperature=1.0, return_loss_breakdown=True)
        _, single_breakdown = single(kept, inv_temperature=1.0, return_loss_breakdown=True)
        # the entropies of the global batch's kept tokens: dropped samples are not in the count
        torch.testing.assert_close(torch.stack(breakdown[:2]), torch.stack(single_breakdown[:2]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        assert (indices[~samples] == -1).all() and (out[~samples] == 0).all(), what
        (out.square().sum() + loss).backward()
        assert torch.isfinite(x.grad).all() and (x.grad[~samples] == 0).all(), what


@pytest.mark.timeout(120)
def test_lfq_sample_mask_counts_the_global_kept_tokens():
    run_in_processes(_lfq_sample_mask_worker, WORLD, timeout=90)
