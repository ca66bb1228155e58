"""Host syncs and op counts of one step of every top-level layer, beside vector-quantize-pytorch's.

    python -m benchmarks.host_syncs            # writes benchmarks/results/host-syncs.{json,md}

A host sync is an op whose result the host must wait for: a value read back (`.item()`,
`bool(t)`, `.tolist()`, `.cpu()`), or an output whose shape depends on the data (`nonzero`, `unique`,
`masked_select`, boolean-mask indexing, `bincount`, `repeat_interleave` without a size). Each
stalls a GPU pipeline and breaks CUDA graphs. A `TorchDispatchMode` sees every op one step
dispatches, backward included, whatever the device, so the counts taken on the CPU are those of
the same code on a GPU, and they are stable: tests/test_host_syncs.py holds them in the suite.

vq_layers runs with VQ_LAYERS_SYNC_FREE=1: its CPU tensors take the paths CUDA tensors take
(kernels/backend.py). "ops" counts the ops that do work (views excluded): on a GPU each is
roughly a kernel launch, and at small sizes their number is the step's fixed cost.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import PEER, RESULTS

aten = torch.ops.aten
# ops that read a value back to the host or whose output shape depends on the data
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.allclose.default,
    aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten.repeat_interleave.Tensor,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
# indexing ops that sync when an index is a boolean mask (it becomes `nonzero` inside)
INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


# reads that bypass the dispatcher for CPU tensors (on a GPU each is a copy to the host): the
# counter wraps these methods while it is active
READ_METHODS = ("tolist", "numpy", "cpu")


class DispatchCount(TorchDispatchMode):
    """Counts the host syncs (`syncs`: op name and, with `where`, the caller's stack) and the
    ops that do work (`ops`, `by_op`) dispatched while it is active."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.ops = 0
        self.by_op: Counter = Counter()
        self.where = where
        self._methods = {}

    def _sync(self, name: str) -> None:
        self.syncs.append((name, "".join(traceback.format_stack(limit=15)[:-2]) if self.where else ""))

    def __enter__(self):
        for name in READ_METHODS:
            original = self._methods[name] = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, _name=name, **kwargs):
                self._sync(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._methods.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func in INDEXING_OPS and any(
                t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])):
            self._sync(str(func))
        if not func.is_view:
            self.ops += 1
            self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Case:
    """One top-level layer configuration: `make(lib)` builds it from vq_layers or the peer
    (None where the peer has no such layer or option), input (b, n, d)."""

    name: str
    make: Callable
    shape: tuple = (4, 256, 64)
    forward: dict = field(default_factory=dict)  # forward keywords, beside the input
    mask: bool = False  # pass a token mask (b, n)
    peer: bool = True


def _lib(lib: str):
    if lib == "vq_layers":
        import vq_layers
        return vq_layers
    import vector_quantize_pytorch
    return vector_quantize_pytorch


def _lfq(size: int, **kw):
    return lambda lib: _lib(lib).LFQ(dim=64, codebook_size=size, entropy_loss_weight=0.1, **kw)


CASES = [
    Case("VectorQuantize 512", lambda lib: _lib(lib).VectorQuantize(dim=64, codebook_size=512)),
    Case("VectorQuantize k-means, dead codes", lambda lib: _lib(lib).VectorQuantize(
        dim=64, codebook_size=512, kmeans_init=True, threshold_ema_dead_code=2)),
    Case("VectorQuantize cosine, mask", lambda lib: _lib(lib).VectorQuantize(
        dim=64, codebook_size=512, use_cosine_sim=True), mask=True),
    Case("VectorQuantize learnable, orthogonal", lambda lib: _lib(lib).VectorQuantize(
        dim=64, codebook_size=512, learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.1)),
    Case("VectorQuantize 4 heads, affine", lambda lib: _lib(lib).VectorQuantize(
        dim=64, codebook_size=512, heads=4, separate_codebook_per_head=True, affine_param=True)),
    Case("ResidualVQ 4 stages", lambda lib: _lib(lib).ResidualVQ(dim=64, codebook_size=512, num_quantizers=4)),
    Case("ResidualVQ dropout, k-means, dead codes", lambda lib: _lib(lib).ResidualVQ(
        dim=64, codebook_size=512, num_quantizers=4, quantize_dropout=True, kmeans_init=True,
        threshold_ema_dead_code=2), mask=True),
    Case("ResidualVQ shared codebook", lambda lib: _lib(lib).ResidualVQ(
        dim=64, codebook_size=512, num_quantizers=4, shared_codebook=True)),
    Case("GroupedResidualVQ 2 groups", lambda lib: _lib(lib).GroupedResidualVQ(
        dim=64, codebook_size=512, num_quantizers=2, groups=2)),
    Case("LFQ 2^8", _lfq(2**8)),
    Case("LFQ 2^10", _lfq(2**10)),
    Case("LFQ 2^14", _lfq(2**14)),
    Case("LFQ 2^16", _lfq(2**16)),
    Case("LFQ 2^10, 2 codebooks, spherical", _lfq(2**10, num_codebooks=2, spherical=True)),
    Case("LFQ 2^10, mask", _lfq(2**10), mask=True),
    Case("ResidualLFQ 4 stages", lambda lib: _lib(lib).ResidualLFQ(
        dim=64, codebook_size=2**10, num_quantizers=4, quantize_dropout=True)),
    Case("GroupedResidualLFQ 2 groups", lambda lib: _lib(lib).GroupedResidualLFQ(
        dim=64, codebook_size=2**10, num_quantizers=2, groups=2)),
    Case("FSQ 8,5,5,5", lambda lib: _lib(lib).FSQ(dim=64, levels=[8, 5, 5, 5])),
    Case("ResidualFSQ 4 stages", lambda lib: _lib(lib).ResidualFSQ(
        dim=64, levels=[8, 5, 5, 5], num_quantizers=4, quantize_dropout=True)),
    Case("GroupedResidualFSQ 2 groups", lambda lib: _lib(lib).GroupedResidualFSQ(
        dim=64, levels=[8, 5, 5, 5], num_quantizers=2, groups=2)),
    Case("SimVQ 512", lambda lib: _lib(lib).SimVQ(dim=64, codebook_size=512)),
    Case("ResidualSimVQ 4 stages", lambda lib: _lib(lib).ResidualSimVQ(
        dim=64, codebook_size=512, num_quantizers=4)),
    Case("LatentQuantize", lambda lib: _lib(lib).LatentQuantize(
        dim=64, levels=[5, 5, 5, 5]), shape=(4, 64, 256)),
    Case("FSP", lambda lib: _lib(lib).FSP(dim=64, levels=[8, 5, 5, 5]), peer=False),
    Case("HierarchicalVQ", lambda lib: _lib(lib).HierarchicalVQ(
        dim=64, codebook_size=512, scales=[1, 4, 16, 64], channel_first=False, nested_dropout=0.5),
         peer=False),
    Case("RandomProjectionQuantizer", lambda lib: _lib(lib).RandomProjectionQuantizer(
        dim=64, codebook_size=512, codebook_dim=32), forward={}),
]


def _call(layer, x, case: Case):
    kwargs = dict(case.forward)
    if case.mask:
        kwargs["mask"] = torch.arange(x.shape[1]) < x.shape[1] * 3 // 4
        kwargs["mask"] = kwargs["mask"].expand(x.shape[0], -1)
    return layer(x, **kwargs)


def _backward(result) -> None:
    """Backward of the sum of every floating output (output, losses) that has a graph."""
    tensors = [result] if isinstance(result, torch.Tensor) else torch.utils._pytree.tree_flatten(result)[0]
    total = sum(t.float().mean() for t in tensors
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()


def count(case: Case, lib: str, train: bool = True, where: bool = False, warmup: int = 4) -> DispatchCount:
    """The syncs and ops of one step (train: forward + backward; eval: forward under no_grad)
    after `warmup` steps: one-time work happens there (k-means init of every stage, also of
    those quantize dropout skipped at first; the kernels' first-call checks)."""
    torch.manual_seed(0)
    layer = case.make(lib).train(train)
    x = torch.randn(*case.shape, requires_grad=train)

    def step():
        if train:
            _backward(_call(layer, x, case))
        else:
            with torch.no_grad():
                _call(layer, x, case)

    for _ in range(warmup):
        step()
    with DispatchCount(where) as counted:
        step()
    return counted


def measure(cases=CASES) -> list[dict]:
    rows = []
    os.environ["VQ_LAYERS_SYNC_FREE"] = "1"
    for case in cases:
        row = {"layer": case.name}
        for lib in ("vq_layers", PEER):
            if lib == PEER and not case.peer:
                continue
            for train in (True, False):
                try:
                    counted = count(case, lib, train)
                    row[f"{lib} {'train' if train else 'eval'}"] = {"syncs": len(counted.syncs), "ops": counted.ops}
                except Exception as error:  # the peer's layer may not take the configuration
                    row[f"{lib} {'train' if train else 'eval'}"] = {"error": f"{type(error).__name__}"}
        rows.append(row)
        print(row, flush=True)
    return rows


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    return entry.get("error") or f"{entry['syncs']} / {entry['ops']}"


def table(rows: list[dict]) -> str:
    head = ["layer", "vq_layers train", f"{PEER} train", "vq_layers eval", f"{PEER} eval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["layer"]] + [_cell(row.get(f"{lib} {mode}")) for mode in ("train", "eval")
                                  for lib in ("vq_layers", PEER)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTE = ("Each cell: host syncs / ops that do work, in one step after four warm-up steps, input (4, 256, 64) "
        "fp32 (train: forward and backward of the output's and losses' means; eval: forward under no_grad). "
        "vq_layers on the path CUDA takes (VQ_LAYERS_SYNC_FREE=1).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import vector_quantize_pytorch

    rows = measure()
    path = Path(args.out) / "host-syncs"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "host syncs and ops per step", "torch": torch.__version__,
               "peer": vector_quantize_pytorch.__version__ if hasattr(vector_quantize_pytorch, "__version__") else "",
               "rows": rows}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    path.with_suffix(".md").write_text(f"Host syncs and ops per step\n\n{table(rows)}\n\n{NOTE}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
