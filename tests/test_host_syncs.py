"""Host syncs per step, counted by a dispatch mode (benchmarks/host_syncs.py), on the path CUDA
takes (VQ_LAYERS_SYNC_FREE=1): at most one per training step of any top-level layer (the refusal
of non-finite input, where the step writes statistics), none in eval forwards or decoding.

A count is not a timing: it is the same on every machine, so it belongs in the suite."""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import CASES, DispatchCount, count
from tests.reference import randn
from vq_layers import GroupedResidualVQ, HierarchicalVQ

OURS = {case.name: case for case in CASES}


@pytest.fixture(autouse=True)
def cuda_paths(monkeypatch):
    monkeypatch.setenv("VQ_LAYERS_SYNC_FREE", "1")


def test_the_counter_sees_reads_data_dependent_shapes_and_the_backward():
    """The instrument can fail: each kind of sync it must see, and the backward's ops."""
    x = torch.randn(8, 4, requires_grad=True)
    with DispatchCount() as counted:
        (x * 2).sum().item()
        x.detach().nonzero()
        x.detach()[x.detach() > 0]
        torch.unique(x.detach())
        bool((x > 0).any())
        x.detach().amax().tolist()
    assert [name.split(".")[1] for name, _ in counted.syncs] == [
        "_local_scalar_dense", "nonzero", "index", "_unique2", "_local_scalar_dense", "tolist"], counted.syncs
    with DispatchCount() as counted:
        (x * 2).sum().backward()
    assert counted.ops >= 3 and not counted.syncs  # mul, sum, and their backward (expand is a view)


def _initialized(layer) -> bool:
    return all(bool(buffer.all()) for name, buffer in layer.named_buffers() if name.endswith("initted"))


@pytest.mark.parametrize("name", [name for name in OURS if "LFQ" not in name])
def test_one_sync_per_training_step_none_in_eval(name):
    """Every case of the benchmark table: whatever the configuration (k-means init, dead codes,
    quantize dropout, masks, heads, shared codebooks, groups), a training step reads back at
    most one value, an eval forward none."""
    case = OURS[name]
    train = count(case, "vq_layers", train=True, where=True)
    assert len(train.syncs) <= 1, "".join(f"{op}\n{where}" for op, where in train.syncs)
    evaluation = count(case, "vq_layers", train=False, where=True)
    assert not evaluation.syncs, "".join(f"{op}\n{where}" for op, where in evaluation.syncs)


def test_the_counted_step_comes_after_k_means_init():
    """The count is of a steady step: with quantize dropout, stages skipped in the first steps
    initialize later; four warm-up steps initialize all (else the count would include init)."""
    case = OURS["ResidualVQ dropout, k-means, dead codes"]
    torch.manual_seed(0)
    layer = case.make("vq_layers").train()
    x = torch.randn(*case.shape, requires_grad=True)
    for _ in range(4):
        layer(x, mask=torch.ones(case.shape[:2], dtype=torch.bool))[0].sum().backward()
    assert _initialized(layer)


def test_grouped_residual_vq_refuses_non_finite_input_in_any_group_before_any_group_changes():
    """The groups' inputs are judged in one read (after their projections), before any group's
    statistics change: a NaN in the last group's slice leaves every group as it was."""
    for kwargs in ({}, {"codebook_dim": 3}):
        torch.manual_seed(0)
        layer = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16, **kwargs).train()
        layer(randn(2, 5, 8).requires_grad_(True))[0].sum().backward()  # a first step
        saved = {name: t.clone() for name, t in layer.state_dict().items()}
        x = randn(2, 5, 8, seed=1)
        x[1, 3, -1] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            layer(x.requires_grad_(True))
        for name, t in layer.state_dict().items():
            assert torch.equal(t, saved[name]) or (t.isnan() == saved[name].isnan()).all(), name


def test_hierarchical_vq_refuses_non_finite_input_once_before_any_level_changes():
    torch.manual_seed(0)
    layer = HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 2, 4], channel_first=False,
                           shared_codebook=False).train()
    layer(randn(2, 4, 4).requires_grad_(True))[0].sum().backward()
    saved = {name: t.clone() for name, t in layer.state_dict().items()}
    x = randn(2, 4, 4, seed=2)
    x[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x.requires_grad_(True))
    for name, t in layer.state_dict().items():
        assert torch.equal(t, saved[name]), name
