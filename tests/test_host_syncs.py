"""Host syncs and op counts of one step, on the path CUDA tensors take (VQ_LAYERS_SYNC_FREE=1
makes CPU tensors take it), counted by benchmarks/host_syncs.py's dispatch mode.

A host sync (`.item()`, `nonzero`, boolean-mask indexing, ...) stalls a GPU's queue and breaks
CUDA graphs; the number of ops that do work is roughly the number of kernel launches, a step's
fixed cost at small sizes. The layers' cases are benchmarks.host_syncs.CASES, filtered by name:
a family joins by adding its prefix to FAMILIES (and its budgets below).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import CASES, DispatchCount, count

FAMILIES = ("LFQ", "ResidualLFQ", "GroupedResidualLFQ")
# training-step ops at most this multiple of the peer's (measured in the same test)
OPS_RATIO = {"LFQ 2^8": 2.0, "LFQ 2^10": 2.0, "LFQ 2^14": 2.0}


def cases(prefixes=FAMILIES) -> list:
    return [pytest.param(case, id=case.name) for case in CASES if case.name.split(" ")[0] in prefixes]


def train_syncs_allowed(case) -> int:
    """Quantize dropout may draw its depth on the host (one read), nothing else may."""
    return 1 if getattr(case.make("vq_layers"), "quantize_dropout", False) else 0


@pytest.fixture(autouse=True)
def cuda_path(monkeypatch):
    monkeypatch.setenv("VQ_LAYERS_SYNC_FREE", "1")


def syncs(counted: DispatchCount) -> list[str]:
    return [name for name, _ in counted.syncs]


@pytest.mark.parametrize("case", cases())
def test_no_host_sync_in_training_step(case):
    counted = count(case, "vq_layers", train=True)
    assert len(counted.syncs) <= train_syncs_allowed(case), syncs(counted)


@pytest.mark.parametrize("case", cases())
def test_no_host_sync_in_eval_step(case):
    assert syncs(count(case, "vq_layers", train=False)) == []


@pytest.mark.parametrize("case", [c for c in cases() if c.id in OPS_RATIO])
def test_training_ops_against_the_peer(case):
    pytest.importorskip("vector_quantize_pytorch")
    ours, peer = count(case, "vq_layers").ops, count(case, "vector-quantize-pytorch").ops
    assert ours <= OPS_RATIO[case.name] * peer, (ours, peer)


@pytest.mark.parametrize("case", cases())
def test_no_host_sync_in_decoding(case):
    torch.manual_seed(0)
    layer = case.make("vq_layers").eval()
    with torch.no_grad():
        _, indices, *_ = layer(torch.randn(*case.shape))
        decode = getattr(layer, "indices_to_codes", None) or layer.get_output_from_indices
        decode(indices)  # warm-up
        with DispatchCount() as counted:
            decode(indices)
    assert syncs(counted) == []
