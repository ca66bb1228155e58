"""DDP training in real 2-process gloo groups (see `dist_utils`): identical across ranks and
equal to one process on the global batch, and a GAN-style loop of generator and discriminator steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_utils import (
    DIM,
    WORLD,
    _assert_finite,
    _assert_identical_across_ranks,
    _assert_unchanged,
    _AutoEncoder,
    _batch,
    _state,
    _train_and_compare,
    run_in_processes,
)

# ------------------------------------------------------------------------------------------
# 1. DDP training: identical across ranks, equal to one process on the global batch


def _ddp_worker(rank: int, world: int) -> None:
    _train_and_compare(rank, world, "ddp")
    _gan_loop(rank, world)


def _gan_loop(rank: int, world: int) -> None:
    """7. Generator steps (quantizer trains, its loss used), discriminator steps (quantizer under
    no_grad), steps whose quantizer loss is computed but unused, steps without the quantizer."""
    torch.manual_seed(0)
    gen = _AutoEncoder(codebook_size=8, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0,
                       codebook_diversity_loss_weight=0.1)
    disc = nn.Linear(DIM, 1)
    g = DistributedDataParallel(gen, broadcast_buffers=False)
    d = DistributedDataParallel(disc)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    schedule = ["gen", "disc", "gen_vq_loss_unused", "disc_only", "gen", "disc", "gen_vq_loss_unused"]
    for step, kind in enumerate(schedule):
        real = _batch(step, rank)
        if kind.startswith("gen"):
            fake, _, vq_loss = g(real)
            loss = F.mse_loss(fake, real) - d(fake).mean()
            if kind == "gen":
                loss = loss + vq_loss
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
            continue
        if kind == "disc":
            before = _state(gen)
            with torch.no_grad():
                fake, _, _ = g(real)
            _assert_unchanged(before, _state(gen), "no_grad generator forward")
            scores = d(torch.cat([fake, real]))  # one DDP forward per backward
            loss = scores[: len(fake)].mean() - scores[len(fake):].mean()
        else:
            loss = -d(real).mean()
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    state = {**{f"gen.{k}": v for k, v in _state(gen).items()}, **{f"disc.{k}": v for k, v in _state(disc).items()}}
    _assert_identical_across_ranks(state, "GAN loop")
    _assert_finite(state, "GAN loop")
    assert bool(gen.vq._codebook.initted)


@pytest.mark.timeout(150)
def test_ddp_training_equals_single_process_and_gan_loop():
    run_in_processes(_ddp_worker, WORLD, timeout=120)
