"""The collectives the layers issue, recorded in real 2-process gloo groups (see `dist_utils`):
the same sequence on every rank whatever the data, and none outside training steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import RAGGED_STEPS, WORLD, _assert_unchanged, _ragged, _record_collectives, _state, run_in_processes
from vq_layers import FSQ, LFQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize

# ------------------------------------------------------------------------------------------
# 5. the same collectives on every rank, whatever the data


def _quantizers_for_collectives():
    """(name, make())."""
    return [
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, quantize_dropout=True, kmeans_init=True,
                                   kmeans_iters=2, threshold_ema_dead_code=1.5)),
        ("lfq", lambda: LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.1)),
        ("residual lfq", lambda: ResidualLFQ(dim=4, num_quantizers=2, codebook_size=16, quantize_dropout=True)),
        ("vq", lambda: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.5,
                                      codebook_diversity_loss_weight=0.1)),
    ]


def _same_collectives_worker(rank: int, world: int) -> None:
    lockstep = dist.new_group(backend="gloo")  # a side channel to compare the calls as they come
    for name, make in _quantizers_for_collectives():
        torch.manual_seed(0)
        layer = make().train()
        torch.manual_seed(100 + rank)  # local random draws differ between ranks
        with _record_collectives(lockstep) as log:
            for step in range(len(RAGGED_STEPS)):
                log.mark(name, "step", step, RAGGED_STEPS[step])
                x, mask, _ = _ragged(step, rank)
                out, _, loss = layer(x.requires_grad_(), mask=mask)
                log.mark(name, "backward of step", step, RAGGED_STEPS[step])
                (out.square().sum() + loss.sum()).backward()
        calls = [entry for entry in log if entry[0] != "marker"]
        assert calls, f"{name}: the recorder saw no collective in training"
        logs = [None] * world
        dist.all_gather_object(logs, calls)
        assert logs[0] == logs[1], f"{name}: the ranks' collectives differ"


@pytest.mark.timeout(120)
def test_same_collectives_whatever_the_data():
    run_in_processes(_same_collectives_worker, WORLD, timeout=90)


# ------------------------------------------------------------------------------------------
# 6. no collective outside training steps (rank 0 alone: any collective fails or hangs)


def _quantizers_without_collectives():
    """(name, layer, forward keywords, decode(layer, indices) -> tensors)."""
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return [
        ("vq", VectorQuantize(4, 8, kmeans_init=True, threshold_ema_dead_code=1.0, codebook_diversity_loss_weight=0.1),
         {"mask": mask}, lambda m, i: [m.get_output_from_indices(i), m.get_codes_from_indices(i)]),
        ("vq heads", VectorQuantize(4, 8, heads=2, separate_codebook_per_head=True, codebook_dim=2,
                                    threshold_ema_dead_code=1.0, orthogonal_reg_weight=0.1),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("rvq", ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, quantize_dropout=True, kmeans_init=True,
                           threshold_ema_dead_code=1.0), {"mask": mask},
         lambda m, i: [m.get_output_from_indices(i), m.get_codes_from_indices(i)]),
        ("grouped rvq", GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=8, quantize_dropout=True,
                                          threshold_ema_dead_code=1.0),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("lfq", LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1), {"mask": mask},
         lambda m, i: [m.indices_to_codes(i)]),
        ("residual lfq", ResidualLFQ(dim=4, num_quantizers=2, codebook_size=16, quantize_dropout=True),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("fsq", FSQ(levels=[3, 5], dim=4), {}, lambda m, i: [m.indices_to_codes(i)]),
        ("residual fsq", ResidualFSQ(dim=4, levels=[3, 5], num_quantizers=2, quantize_dropout=True),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
    ]


def _no_collectives_worker(rank: int, world: int) -> None:
    if rank != 0:
        return  # rank 0 is alone in the group from here on: a collective would fail or hang
    alone = dist.new_group([0], use_local_synchronization=True)
    with _record_collectives() as log:  # the recorder sees a collective (on a one-rank group)
        dist.all_reduce(torch.zeros(1), group=alone)
    assert log == [("all_reduce", (((1,), "torch.float32"),))]
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    for name, layer, kwargs, decode in _quantizers_without_collectives():
        before = _state(layer)
        with _record_collectives(forbidden=True) as log:
            log.mark(name, "eval forward")
            layer.eval()
            indices = layer(x.clone().requires_grad_(), **kwargs)[1]
            layer.train()
            log.mark(name, "training forward under no_grad")
            with torch.no_grad():
                layer(x, **kwargs)
            log.mark(name, "training forward under inference_mode")
            with torch.inference_mode():
                layer(x, **kwargs)
            log.mark(name, "decoding indices")
            with torch.no_grad():
                decode(layer, indices)
            decode(layer, indices)
        assert all(entry[0] == "marker" for entry in log), name
        _assert_unchanged(before, _state(layer), name)


@pytest.mark.timeout(60)
def test_no_collectives_in_eval_no_grad_inference_or_decoding():
    run_in_processes(_no_collectives_worker, WORLD, timeout=45)
