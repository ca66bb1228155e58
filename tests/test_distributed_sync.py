"""State synchronisation without a DDP wrapper in real 2-process gloo groups (see `dist_utils`):
the first synced step makes the ranks' state one (composite layers' every stage included),
sync_kmeans=False still agrees, sync_codebook=False keeps per-rank codebooks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import (
    WORLD,
    _alone_group,
    _assert_close_state,
    _assert_identical_across_ranks,
    _batch,
    _record_collectives,
    _state,
    run_in_processes,
)
from vq_layers import GroupedResidualVQ, ResidualLFQ, ResidualVQ, VectorQuantize

# ------------------------------------------------------------------------------------------
# 9, 11. no DDP wrapper: the first synced step makes the ranks' state one; sync_codebook=False
# keeps per-rank codebooks


def _plain_group_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    for name, make in [("vq", lambda **kw: VectorQuantize(4, 8, **kw)),
                       ("rvq", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **kw))]:
        torch.manual_seed(rank)  # different initial codebooks on purpose
        layer = make().train()
        gathered = [torch.empty_like(layer.codebooks if name == "rvq" else layer.codebook) for _ in range(world)]
        dist.all_gather(gathered, (layer.codebooks if name == "rvq" else layer.codebook).contiguous())
        assert not torch.equal(gathered[0], gathered[1])  # the premise
        torch.manual_seed(0)  # rank 0's initial state, here on every rank
        single = make(process_group=alone).train()
        batches = [_batch(0, r, dim=4) for r in range(world)]
        layer(batches[rank])
        single(torch.cat(batches))
        state = _state(layer)
        _assert_identical_across_ranks(state, f"{name}: after the first step")
        _assert_close_state(state, _state(single), f"{name}: first step from rank 0's state")

    # sync_kmeans=False: k-means on each rank's own data, which differ a lot here (rank 0's has
    # empty clusters, rank 1's none); the codebooks must still agree, or the ranks would disagree
    # on which codes are dead and issue different collectives (a hang)
    torch.manual_seed(0)
    layer = VectorQuantize(4, 16, kmeans_init=True, kmeans_iters=2, sync_kmeans=False,
                           threshold_ema_dead_code=0.5, decay=0.99).train()
    replaced = 0
    for step in range(4):
        if rank == 0:
            x = torch.cat([torch.ones(36, 4), torch.randn(4, 4, generator=torch.Generator().manual_seed(step))])
        else:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7)) * 50
        layer(x[None].requires_grad_())
        replaced += int(layer._codebook.dead_codes_replaced)
        _assert_identical_across_ranks(_state(layer), f"sync_kmeans=False, step {step}")
    assert replaced > 0, "the dead-code path never ran"

    # sync_codebook=False: each rank trains alone, as a process without a group would
    for kwargs in ({}, {"kmeans_init": True, "kmeans_iters": 2, "threshold_ema_dead_code": 1.0}):
        torch.manual_seed(0)
        layer = VectorQuantize(4, 8, sync_codebook=False, **kwargs).train()
        torch.manual_seed(0)
        single = VectorQuantize(4, 8, process_group=alone, **kwargs).train()
        with _record_collectives() as log:
            for step in range(2):
                torch.manual_seed(step)
                layer(_batch(step, rank, dim=4))
        for step in range(2):
            torch.manual_seed(step)
            single(_batch(step, rank, dim=4))
        assert not log, f"sync_codebook=False issued collectives: {log}"
        state = _state(layer)
        _assert_close_state(state, _state(single), f"sync_codebook=False {kwargs}", tol=0)
        codebook = state["_codebook.embed"]
        gathered = [torch.empty_like(codebook) for _ in range(world)]
        dist.all_gather(gathered, codebook)
        assert not torch.equal(gathered[0], gathered[1]), f"{kwargs}: per-rank codebooks did not diverge"


@pytest.mark.timeout(90)
def test_first_step_broadcasts_state_and_sync_codebook_false_stays_per_rank():
    run_in_processes(_plain_group_worker, WORLD, timeout=60)


# ------------------------------------------------------------------------------------------
# composite layers: every stage identical from the first synced step, whether or not dropout
# runs it (each used to take the first rank's state only at its own first synced step)


def _draw_seeds(module: nn.Module) -> dict[str, torch.Tensor]:
    """The counter streams' seeds (row draws, dropout depths): not buffers, but state every rank
    must hold alike."""
    return {f"{name}.{attr}.seed": getattr(sub, attr).seed for name, sub in module.named_modules()
            for attr in ("sample_draws", "dropout_draws") if hasattr(sub, attr)}


def _composites():
    from vq_layers import HierarchicalVQ, ResidualSimVQ
    # (name, layer, training kwargs): a fixed dropout seed that keeps only the first stage, so
    # the stages after it never run in training
    shallow = next(seed for seed in range(100) if __import__("random").Random(seed).randrange(0, 4) == 0)
    return [
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True),
         {"rand_quantize_dropout_fixed_seed": shallow}),
        ("rvq_kmeans", lambda: ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True,
                                          kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0), {}),
        ("grouped_rvq", lambda: GroupedResidualVQ(dim=4, groups=2, num_quantizers=4, codebook_size=8,
                                                  quantize_dropout=True), {}),
        ("hierarchical", lambda: HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 2, 6], shared_codebook=False,
                                                nested_dropout=0.9, kmeans_init=False, channel_first=False), {}),
        ("residual_sim_vq", lambda: ResidualSimVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True),
         {"rand_quantize_dropout_fixed_seed": shallow}),
        ("residual_lfq", lambda: ResidualLFQ(dim=4, codebook_size=16, num_quantizers=4, quantize_dropout=True), {}),
    ]


def _first_synced_step_worker(rank: int, world: int) -> None:
    for name, make, kwargs in _composites():
        torch.manual_seed(rank)  # each rank builds its own random stages and buffers
        layer = make().train()
        for param in layer.parameters():  # the parameters alike, as DDP would make them (not the buffers)
            dist.broadcast(param.data, 0)
        for step in range(3):
            layer(_batch(step, rank, n=6, dim=4).requires_grad_(True), **kwargs)
        state = {**dict(layer.named_buffers()), **_draw_seeds(layer)}
        _assert_identical_across_ranks(state, f"{name}: after 3 training steps")
        with torch.no_grad():
            _, indices, *_ = layer.eval()(_batch(9, 0, n=6, dim=4))  # the same input on every rank
        indices = torch.cat([i.flatten() for i in indices]) if isinstance(indices, tuple) else indices
        _assert_identical_across_ranks({"indices": indices}, f"{name}: eval indices")


@pytest.mark.timeout(120)
def test_every_stage_identical_from_the_first_synced_step():
    run_in_processes(_first_synced_step_worker, WORLD, timeout=100)
