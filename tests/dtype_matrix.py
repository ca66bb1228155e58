"""The dtype matrix every public layer goes through.

module dtype {fp32, bf16, fp16} x input dtype {fp32, bf16, fp16} x autocast {off, cpu-bf16,
cpu-fp16, cuda-bf16, cuda-fp16 (skipped without a GPU)} x {train, eval}.

A layer test parametrizes over `dtype_matrix()` and calls `run_cell(cell, make_layer,
make_input)`, which checks the contract of docs/design.md: no exception, finite output in the input's
dtype, fp32 losses, int64 indices, statistics buffers still fp32, no float64 tensor anywhere,
and in training a backward pass whose input gradient is finite and in the input's dtype.
It returns what it saw, so the test can add layer-specific checks (e.g. indices == reference).

`run_non_finite_cell(cell, make_layer, make_input, bad)` checks the rule for non-finite input
(docs/precision.md) instead: the input holds NaN/+-inf tokens exactly where `bad` says, and
every cell gives NaN output and index -1 at exactly those tokens, finite output and valid
indices elsewhere, NaN losses, with the dtypes, float64 and buffer checks of `run_cell`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vq_layers.precision import fp32_buffers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCASTS = {
    "off": None,
    "cpu-bf16": ("cpu", torch.bfloat16),
    "cpu-fp16": ("cpu", torch.float16),
    "cuda-bf16": ("cuda", torch.bfloat16),
    "cuda-fp16": ("cuda", torch.float16),
}


@dataclass(frozen=True)
class Cell:
    module_dtype: str
    input_dtype: str
    autocast: str
    train: bool

    @property
    def device(self) -> str:
        return "cuda" if self.autocast.startswith("cuda") else "cpu"

    def autocast_context(self):
        spec = AUTOCASTS[self.autocast]
        return torch.autocast(spec[0], dtype=spec[1]) if spec else contextlib.nullcontext()

    def __str__(self) -> str:
        mode = "train" if self.train else "eval"
        return f"module_{self.module_dtype}-input_{self.input_dtype}-autocast_{self.autocast}-{mode}"


CPU_AUTOCASTS = ("off", "cpu-bf16", "cpu-fp16")


def dtype_matrix(train=(True, False), autocasts=tuple(AUTOCASTS)) -> list:
    """pytest params for every cell; CUDA cells are skipped without a GPU."""
    cells = []
    for module_dtype in DTYPES:
        for input_dtype in DTYPES:
            for autocast in autocasts:
                for is_train in train:
                    cell = Cell(module_dtype, input_dtype, autocast, is_train)
                    marks = ()
                    if cell.device == "cuda":
                        marks = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
                    cells.append(pytest.param(cell, id=str(cell), marks=marks))
    return cells


class RecordDtypes(TorchDispatchMode):
    """Records the dtype of every tensor any op produces (below autocast, so nothing escapes)."""

    def __init__(self):
        super().__init__()
        self.float64_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64_ops.append(str(func))
        return out


@dataclass
class Parts:
    output: torch.Tensor
    indices: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    others: list = field(default_factory=list)  # further floating outputs, e.g. all codes


def default_unpack(result) -> Parts:
    """(output, *rest): int tensors are indices, 0-dim floats losses, other floats outputs."""
    if isinstance(result, torch.Tensor):
        return Parts(result)
    output, *rest = result
    parts = Parts(output)
    for t in tree_flatten(rest)[0]:
        if not isinstance(t, torch.Tensor):
            continue
        if not t.is_floating_point():
            parts.indices.append(t)
        elif t.ndim == 0:
            parts.losses.append(t)
        else:
            parts.others.append(t)
    return parts


@dataclass
class CellResult:
    layer: torch.nn.Module
    x: torch.Tensor
    parts: Parts


def _check_buffers(layer, when):
    for name, buf in fp32_buffers(layer):
        assert buf.dtype == torch.float32, f"statistics buffer {name} is {buf.dtype} {when}"


def run_cell(
    cell: Cell,
    make_layer: Callable[[], torch.nn.Module],
    make_input: Callable[[torch.dtype], torch.Tensor],
    forward: Callable | None = None,
    unpack: Callable = default_unpack,
    backward: bool = True,
) -> CellResult:
    torch.manual_seed(0)
    input_dtype = DTYPES[cell.input_dtype]
    layer = make_layer().to(device=cell.device, dtype=DTYPES[cell.module_dtype])
    layer.train(cell.train)
    _check_buffers(layer, f"after .to({cell.module_dtype})")

    x = make_input(input_dtype).to(cell.device)
    assert x.dtype == input_dtype, "make_input must honour the dtype it is given"
    if cell.train and backward and x.is_floating_point():
        x.requires_grad_(True)

    recorder = RecordDtypes()
    with recorder, cell.autocast_context():
        result = forward(layer, x) if forward else layer(x)
    parts = unpack(result)

    out = parts.output
    assert out.dtype == input_dtype, f"output dtype {out.dtype} != input dtype {input_dtype}"
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    for t in parts.others:
        assert t.dtype == input_dtype, f"extra output dtype {t.dtype} != input dtype {input_dtype}"
        assert torch.isfinite(t).all(), "extra output has NaN/Inf"
    for t in parts.indices:
        assert t.dtype == torch.long, f"indices dtype {t.dtype} != int64"
    for t in parts.losses:
        assert t.dtype == torch.float32, f"loss dtype {t.dtype} != float32"
        assert torch.isfinite(t).all(), "loss is NaN/Inf"

    if cell.train and backward and x.requires_grad:
        with recorder:
            # the output alone must carry a gradient to the input (straight-through)
            assert out.requires_grad, "the output does not require grad in training"
            (grad,) = torch.autograd.grad(out.float().square().mean(), x, retain_graph=True, allow_unused=True)
            assert grad is not None and grad.abs().sum() > 0, "no gradient from the output reached the input"
            assert grad.dtype == input_dtype, f"input grad dtype {grad.dtype} != {input_dtype}"
            assert torch.isfinite(grad).all(), "input gradient has NaN/Inf"
            if parts.losses:
                sum(loss.sum() for loss in parts.losses).backward()

    assert not recorder.float64_ops, f"float64 tensors produced by {sorted(set(recorder.float64_ops))}"
    _check_buffers(layer, "after forward")
    return CellResult(layer, x, parts)


def _at_tokens(bad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """bad (b, n) (or (b, 1): the whole sample) -> a mask of t (b, n_t, ...)'s elements."""
    at = bad.expand(t.shape[0], t.shape[1])
    return at.reshape(*at.shape, *(1,) * (t.ndim - 2)).expand_as(t)


def run_non_finite_cell(
    cell: Cell,
    make_layer: Callable[[], torch.nn.Module],
    make_input: Callable[[torch.dtype], torch.Tensor],
    bad: torch.Tensor,
    forward: Callable | None = None,
    unpack: Callable = default_unpack,
) -> CellResult:
    """One forward of a batch with non-finite tokens where `bad` (b, n) is True (or (b, 1): every
    token of those samples). `unpack` gives the output, the indices and further outputs in token
    layout (b, n, ...) and the batch losses; an output may be None (a layer that returns indices)."""
    torch.manual_seed(0)
    input_dtype = DTYPES[cell.input_dtype]
    layer = make_layer().to(device=cell.device, dtype=DTYPES[cell.module_dtype])
    layer.train(cell.train)
    x = make_input(input_dtype).to(cell.device)
    assert x.dtype == input_dtype, "make_input must honour the dtype it is given"
    bad = bad.to(cell.device)

    recorder = RecordDtypes()
    with recorder, cell.autocast_context():
        result = forward(layer, x) if forward else layer(x)
    parts = unpack(result)

    for t in (parts.output, *parts.others):
        if t is None:
            continue
        assert t.dtype == input_dtype, f"output dtype {t.dtype} != input dtype {input_dtype}"
        at = _at_tokens(bad, t)
        assert t[at].isnan().all(), "output is not NaN at a non-finite token"
        assert torch.isfinite(t[~at]).all(), "output has NaN/Inf at a finite token"
    for t in parts.indices:
        assert t.dtype == torch.long, f"indices dtype {t.dtype} != int64"
        at = _at_tokens(bad, t)
        assert (t[at] == -1).all(), "index is not -1 at a non-finite token"
        assert (t[~at] >= 0).all(), "index -1 (or out of range) at a finite token"
    for t in parts.losses:
        assert t.dtype == torch.float32, f"loss dtype {t.dtype} != float32"
        assert t.isnan().all(), "loss is not NaN with a non-finite token"

    assert not recorder.float64_ops, f"float64 tensors produced by {sorted(set(recorder.float64_ops))}"
    _check_buffers(layer, "after forward")
    return CellResult(layer, x, parts)
