"""Tests of `vq_layers.distributed` in real 2-process gloo groups (see `dist_utils`).

Every rank's input is a pure function of (rank, seed), so each rank rebuilds all the ranks'
inputs locally and computes the expected collective result without any communication.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from dist_utils import free_port, init_group, run_in_processes
from vq_layers.distributed import (
    all_gather,
    all_reduce_mean,
    all_reduce_sum,
    all_reduce_sum_,
    any_rank,
    broadcast_,
    check_finite,
    is_distributed,
    world_size,
)

WORLD = 2

# all_gather cases: (rows on rank 0, rows on rank 1), shape of one row, dtype.
GATHER_CASES = [
    ((3, 0), (2, 3), torch.float32),  # rank 1 contributes nothing
    ((0, 2), (2, 3), torch.float32),  # rank 0 contributes nothing
    ((2, 5), (), torch.float32),  # plain vectors of different lengths
    ((0, 0), (4,), torch.float32),  # nothing anywhere
    ((4, 1), (), torch.long),  # code indices
]


def _input(rank: int, *shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=generator, dtype=dtype)
    return torch.randint(0, 1000, shape, generator=generator, dtype=dtype)


def _check_collectives(rank: int, group) -> None:
    """The helpers over a 2-rank `group` (None: the default group) against local references."""
    ranks = range(WORLD)
    assert is_distributed(group)
    assert world_size(group) == WORLD

    t = _input(rank, 3, 4, seed=1)
    assert all_reduce_sum_(t, group=group) is t  # in place
    assert_close(t, sum(_input(r, 3, 4, seed=1) for r in ranks))

    for src in range(WORLD):
        t = _input(rank, 5, seed=2)
        assert broadcast_(t, src=src, group=group) is t
        assert_close(t, _input(src, 5, seed=2), rtol=0, atol=0)

    # Each rank back-propagates its own upstream gradient; the input receives their mean.
    x = _input(rank, 3, 2, seed=3).requires_grad_()
    y = all_reduce_mean(x, group=group)
    assert y is not x
    assert_close(y, sum(_input(r, 3, 2, seed=3) for r in ranks) / WORLD)
    assert_close(x.detach(), _input(rank, 3, 2, seed=3), rtol=0, atol=0)  # input untouched
    y.backward(_input(rank, 3, 2, seed=4))
    assert_close(x.grad, sum(_input(r, 3, 2, seed=4) for r in ranks) / WORLD)

    for case, (rows, row_shape, dtype) in enumerate(GATHER_CASES):
        def make(r):
            return _input(r, rows[r], *row_shape, seed=10 + case, dtype=dtype)

        out = all_gather(make(rank), group=group)
        expected = torch.cat([make(r) for r in ranks])  # rank 0's rows first
        assert out.dtype == dtype and out.shape == expected.shape, (case, out.shape)
        assert torch.equal(out, expected), case


def _check_strided_inputs(rank: int) -> None:
    """Views and layouts that differ between ranks still combine element by element.

    Gloo itself walks raw memory from the data pointer, ignoring strides; the helpers must
    hand it contiguous buffers.
    """
    # A strided column of a buffer: only that column changes, its neighbours keep their values.
    buf = _input(rank, 4, 3, seed=20)
    all_reduce_sum_(buf[:, 1])
    expected = _input(rank, 4, 3, seed=20)
    expected[:, 1] = sum(_input(r, 4, 3, seed=20)[:, 1] for r in range(WORLD))
    assert_close(buf, expected)

    buf = _input(rank, 4, 3, seed=21)
    broadcast_(buf[:, 2], src=1)
    expected = _input(rank, 4, 3, seed=21)
    expected[:, 2] = _input(1, 4, 3, seed=21)[:, 2]
    assert_close(buf, expected, rtol=0, atol=0)

    # Same logical tensor, column-major on rank 0 only.
    def laid_out(t):
        return t.t().contiguous().t() if rank == 0 else t

    t = laid_out(_input(rank, 2, 3, seed=22))
    all_reduce_sum_(t)
    assert_close(t, sum(_input(r, 2, 3, seed=22) for r in range(WORLD)))
    y = all_reduce_mean(laid_out(_input(rank, 2, 3, seed=23)))
    assert_close(y, sum(_input(r, 2, 3, seed=23) for r in range(WORLD)) / WORLD)


@contextlib.contextmanager
def _spy_on_collectives():
    """Yields the list of `group` arguments that torch collectives (and get_world_size) get."""
    used_groups = []

    def spy(collective):
        def wrapper(*args, **kwargs):
            bound = inspect.signature(collective).bind(*args, **kwargs)
            used_groups.append(bound.arguments.get("group"))
            return collective(*args, **kwargs)

        return wrapper

    names = ("all_reduce", "broadcast", "all_gather", "get_world_size")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(dist, name, spy(getattr(dist, name))))
        yield used_groups


def _check_explicit_groups(rank: int) -> None:
    # new_group is collective: every rank creates every group, in the same order.
    both = dist.new_group([0, 1])
    alone = [dist.new_group([0]), dist.new_group([1])][rank]
    # With two processes `both` sums like the default group, so spy on the collectives to see
    # that they really run on the group they were given.
    with _spy_on_collectives() as used_groups:
        _check_collectives(rank, both)
    assert used_groups and all(g is both for g in used_groups), used_groups

    # A one-rank group inside a 2-rank world: no communication, although the default group
    # would sum both ranks' values if the helpers ignored `group`.
    assert not is_distributed(alone) and world_size(alone) == 1
    t = _input(rank, 3, seed=30)
    assert all_reduce_sum_(t, group=alone) is t
    assert_close(t, _input(rank, 3, seed=30), rtol=0, atol=0)
    assert broadcast_(t, src=rank, group=alone) is t
    assert_close(t, _input(rank, 3, seed=30), rtol=0, atol=0)
    assert all_reduce_mean(t, group=alone) is t
    assert all_gather(t, group=alone) is t


def _check_sum_without_graph_on_one_rank(rank):
    # Rank 0's share carries no graph (its batch was empty); rank 1's does. Both backward
    # passes must run the all-reduce, or rank 1 would wait for rank 0 forever; any_rank agrees.
    x = torch.arange(3.0) + rank
    if rank == 1:
        x.requires_grad_()
    total = all_reduce_sum(x)
    assert total.requires_grad  # on rank 0 too: the backward all-reduce will run there
    total.mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    if rank == 1:
        assert torch.equal(x.grad, torch.tensor([2.0, 4.0, 6.0]))  # both ranks' gradients summed
    with torch.no_grad():
        assert not all_reduce_sum(torch.ones(1)).requires_grad
    assert any_rank(torch.tensor(rank == 1)) and not any_rank(torch.tensor(False))
    assert any_rank(torch.tensor(rank == 1), sync=False) == (rank == 1)
    # a NaN on rank 1 raises on both ranks; alone (sync=False), on rank 1 only
    x = torch.tensor([1.0, float("nan") if rank == 1 else 2.0])
    with pytest.raises(ValueError, match="^bad$"):
        check_finite(x, "bad")
    with pytest.raises(ValueError) if rank == 1 else contextlib.nullcontext():
        check_finite(x, "bad", sync=False)
    check_finite(torch.ones(2), "bad")


def _worker_helpers(rank, world):
    # One spawn for all the group checks (spawning torch costs seconds). Started with
    # init=False so that is_distributed is seen before, during and after the group.
    assert not is_distributed() and world_size() == 1
    init_group(rank, world)
    assert is_distributed() and world_size() == world

    _check_collectives(rank, None)
    _check_strided_inputs(rank)
    _check_explicit_groups(rank)
    _check_sum_without_graph_on_one_rank(rank)

    dist.destroy_process_group()
    assert not is_distributed() and world_size() == 1  # not cached from inside the group
    t = torch.ones(2)
    assert all_reduce_sum_(t) is t and torch.equal(t, torch.ones(2))


def _worker_fails_on_rank_1(rank, world):
    if rank == 1:
        raise AssertionError("rank 1 failed on purpose")
    dist.barrier()  # rank 0 waits for a peer that never comes: must be killed, not awaited


def _worker_sleeps(rank, world):
    time.sleep(3600)


def test_helpers_in_a_two_rank_group():
    run_in_processes(_worker_helpers, WORLD, init=False)


@pytest.mark.parametrize("group", [None, object()], ids=["default", "explicit"])
def test_helpers_are_identities_without_process_group(group):
    # In the pytest process itself, which never initializes a group; an explicit `group` must
    # not even be looked at.
    assert not dist.is_initialized()
    assert not is_distributed(group) and world_size(group) == 1

    t = torch.arange(6.0).reshape(3, 2)
    assert all_reduce_sum_(t, group=group) is t
    assert broadcast_(t, src=1, group=group) is t
    assert torch.equal(t, torch.arange(6.0).reshape(3, 2))
    assert all_gather(t, group=group) is t

    x = torch.arange(3.0, requires_grad=True)
    y = all_reduce_mean(x, group=group)
    assert y is x
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))

    check_finite(t, "bad", group=group)
    with pytest.raises(ValueError, match="^bad$"):
        check_finite(torch.tensor([0.0, float("inf")]), "bad", group=group)


def test_check_finite_compiles_to_an_assert_in_the_graph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: check_finite(x, "bad", sync=False) or x * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="bad"):
        fn(torch.tensor([1.0, float("nan"), 2.0]))


def test_world_of_one_is_not_distributed():
    assert not is_distributed()
    address = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        assert not is_distributed() and world_size() == 1
        x = torch.ones(2, requires_grad=True)
        assert all_reduce_mean(x) is x  # identity, not a collective over one rank
    finally:
        dist.destroy_process_group()
    assert not is_distributed()


def test_launcher_reports_a_failing_rank_with_its_traceback():
    # Without this, a child's failed assert could go unnoticed and every test above would pass.
    with pytest.raises(mp.ProcessRaisedException, match="(?s)Traceback.*rank 1 failed on purpose"):
        run_in_processes(_worker_fails_on_rank_1, WORLD)


def test_launcher_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_in_processes(_worker_sleeps, WORLD, timeout=3.0, init=False)
    assert time.monotonic() - start < 30
    assert not mp.active_children()  # the sleepers were killed and reaped


def _worker_subgroup_without_rank_0(rank, world):
    """Quantize dropout over a group that leaves out global rank 0: its seed comes from the
    group's own first rank, and both members drop the same stages."""
    from vq_layers import ResidualFSQ
    from vq_layers.distributed import first_rank

    group = dist.new_group([1, 2])  # every rank must take part in creating it
    if rank == 0:
        return
    assert first_rank(group) == 1
    torch.manual_seed(100 + rank)  # different local generators: only the broadcast aligns them
    layer = ResidualFSQ(dim=4, levels=[5] * 4, num_quantizers=6, quantize_dropout=True, process_group=group).train()
    for _ in range(4):
        _, indices = layer(torch.randn(2, 8, 4))
        kept = torch.tensor([int((indices[..., k] >= 0).all()) for k in range(6)])
        gathered = [torch.zeros_like(kept) for _ in range(2)]
        dist.all_gather(gathered, kept, group=group)
        assert torch.equal(gathered[0], gathered[1]), gathered


def test_quantize_dropout_over_a_group_without_rank_0():
    run_in_processes(_worker_subgroup_without_rank_0, 3)
