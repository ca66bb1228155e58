"""Per-rank batches that differ in real 2-process gloo groups (see `dist_utils`): uneven, empty
and all-masked batches, and a NaN on one rank that must raise on every rank.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import (
    RAGGED_STEPS,
    WORLD,
    _alone_group,
    _assert_close_state,
    _assert_finite,
    _assert_identical_across_ranks,
    _assert_unchanged,
    _batch,
    _ragged,
    _state,
    run_in_processes,
)
from vq_layers import LFQ, ResidualVQ, VectorQuantize

# ------------------------------------------------------------------------------------------
# 4. uneven, empty and all-masked per-rank batches


def _quantizers_for_ragged():
    """(name, make(**extra), single-process extra keywords or None: no single reference)."""
    return [
        ("vq ema", lambda **kw: VectorQuantize(4, 8, **kw), {"sync_codebook": False}),
        ("vq kmeans dead codes", lambda **kw: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2,
                                                            threshold_ema_dead_code=1.0, **kw), None),
        ("rvq ema", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **kw),
         {"sync_codebook": False}),
        ("rvq kmeans dead codes", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, kmeans_init=True,
                                                         kmeans_iters=2, threshold_ema_dead_code=1.0, **kw), None),
        ("lfq", lambda **kw: LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, **kw), "alone"),
    ]


def _ragged_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    for name, make, single_kwargs in _quantizers_for_ragged():
        torch.manual_seed(0)
        layer = make().train()
        single = None
        if single_kwargs is not None:
            torch.manual_seed(0)
            single = make(**({"process_group": alone} if single_kwargs == "alone" else single_kwargs)).train()
        initial = _state(layer)
        torch.manual_seed(100 + rank)
        for step in range(len(RAGGED_STEPS)):
            what = f"{name}, step {step}"
            x, mask, _ = _ragged(step, rank)
            x.requires_grad_()
            kept = torch.cat([_ragged(step, r)[2] for r in range(world)])[None]  # (1, N, dim)
            if isinstance(layer, LFQ):
                (out, _, loss), breakdown = layer(x, mask=mask, inv_temperature=1.0, return_loss_breakdown=True)
                _, single_breakdown = single(kept, inv_temperature=1.0, return_loss_breakdown=True)
                torch.testing.assert_close(torch.stack(breakdown[:2]), torch.stack(single_breakdown[:2]),
                                           rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
            else:
                out, _, loss = layer(x, mask=mask)
                if single is not None:
                    single(kept)
            assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(loss).all(), what
            (out.square().sum() + loss.sum()).backward()
            assert torch.isfinite(x.grad).all(), what
            state = _state(layer)
            _assert_identical_across_ranks(state, what)
            _assert_finite(state, what)
            if single is not None and not isinstance(layer, LFQ):
                _assert_close_state(state, _state(single), what)
        if not isinstance(layer, LFQ):
            assert any(not torch.equal(state[k], initial[k]) for k in state), f"{name}: nothing trained"


@pytest.mark.timeout(120)
def test_uneven_empty_and_masked_batches():
    run_in_processes(_ragged_worker, WORLD, timeout=90)


# ------------------------------------------------------------------------------------------
# 8. a NaN on one rank raises on every rank


def _nan_worker(rank: int, world: int) -> None:
    layers = [
        ("vq", lambda: VectorQuantize(4, 8), True),
        ("vq kmeans dead codes", lambda: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2,
                                                       threshold_ema_dead_code=1.0), False),
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8), True),
    ]
    for name, make, warm_up in layers:
        torch.manual_seed(0)
        layer = make().train()
        if warm_up:  # a normal step first (the state broadcast and the EMA have run)
            layer(_batch(0, rank, dim=4))
        before = _state(layer)
        x = _batch(1, rank, dim=4)
        if rank == 0:
            x[1, 2, 3] = math.nan
        with pytest.raises(ValueError):
            layer(x)
        _assert_unchanged(before, _state(layer), f"{name} after the NaN step")
        # padding may hold NaN: it never enters
        layer(x, mask=~torch.isnan(x).any(-1))
        layer(_batch(2, rank, dim=4))
        state = _state(layer)
        _assert_identical_across_ranks(state, name)
        _assert_finite(state, name)
        assert any(not torch.equal(state[k], before[k]) for k in state), f"{name}: the normal steps changed nothing"


@pytest.mark.timeout(90)
def test_nan_on_one_rank_raises_on_every_rank():
    run_in_processes(_nan_worker, WORLD, timeout=60)
