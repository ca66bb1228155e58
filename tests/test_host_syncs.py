"""Host syncs and op counts of one step, on the path CUDA tensors take (VQ_LAYERS_SYNC_FREE=1
makes CPU tensors take it), counted by benchmarks/host_syncs.py's dispatch mode.

A host sync (`.item()`, `nonzero`, boolean-mask indexing, ...) stalls a GPU's queue and breaks
CUDA graphs; the number of ops that do work is roughly the number of kernel launches, a step's
fixed cost at small sizes. The limits (docs/design.md, "Host syncs"): at most one sync per
training step of any top-level layer (the refusal of non-finite input, where the step writes
statistics), none for layers without statistics, none in eval forwards; decoding reads its
indices' range back once, to raise on a bad one. A count is not a timing: it is the same on
every machine, so it belongs in the suite. The cases are benchmarks.host_syncs.CASES.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import CASES, DispatchCount, count
from tests.reference import randn
from vq_layers import GroupedResidualVQ, HierarchicalVQ

# families without codebook statistics: nothing to refuse, so no read at all
STATELESS = ("LFQ", "ResidualLFQ", "GroupedResidualLFQ", "FSQ", "ResidualFSQ", "GroupedResidualFSQ", "FSP")
# training-step ops at most this multiple of the peer's (measured in the same test)
OPS_RATIO = {"LFQ 2^8": 2.0, "LFQ 2^10": 2.0, "LFQ 2^14": 2.0}
OURS = {case.name: case for case in CASES}


def cases(keep=lambda case: True) -> list:
    return [pytest.param(case, id=case.name) for case in CASES if keep(case)]


def train_syncs_allowed(case) -> int:
    return 0 if case.name.split(" ")[0] in STATELESS else 1


@pytest.fixture(autouse=True)
def cuda_path(monkeypatch):
    monkeypatch.setenv("VQ_LAYERS_SYNC_FREE", "1")


def where(counted: DispatchCount) -> str:
    return "".join(f"{op}\n{stack}" for op, stack in counted.syncs)


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


@pytest.mark.parametrize("case", cases())
def test_training_step_syncs(case):
    """Whatever the configuration (k-means init, dead codes, quantize dropout, masks, heads,
    shared codebooks, groups, LFQ at any size): at most the one refusal read."""
    counted = count(case, "vq_layers", train=True, where=True)
    assert len(counted.syncs) <= train_syncs_allowed(case), where(counted)


@pytest.mark.parametrize("case", cases())
def test_no_sync_in_eval_step(case):
    counted = count(case, "vq_layers", train=False, where=True)
    assert not counted.syncs, where(counted)


@pytest.mark.parametrize("case", cases(lambda case: case.name in OPS_RATIO))
def test_training_ops_against_the_peer(case):
    pytest.importorskip("vector_quantize_pytorch")
    ours, peer = count(case, "vq_layers").ops, count(case, "vector-quantize-pytorch").ops
    assert ours <= OPS_RATIO[case.name] * peer, (ours, peer)


def _decoder(layer, case):
    if case.name == "HierarchicalVQ":
        return lambda indices: layer.get_output_from_indices(indices, case.shape[1:2])
    return getattr(layer, "indices_to_codes", None) or layer.get_output_from_indices


@pytest.mark.parametrize("case", cases(lambda case: case.name != "RandomProjectionQuantizer"))
def test_decoding_reads_once(case):
    """Decoding reads the indices' range back once (all stages, levels or groups at a time), so
    that a bad index raises ValueError rather than reaching a gather; nothing else."""
    torch.manual_seed(0)
    layer = case.make("vq_layers").eval()
    with torch.no_grad():
        indices = layer(torch.randn(*case.shape))[1]
        decode = _decoder(layer, case)
        decode(indices)  # warm-up
        with DispatchCount(where=True) as counted:
            decode(indices)
    assert counted.ops and len(counted.syncs) <= 1, where(counted)


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
