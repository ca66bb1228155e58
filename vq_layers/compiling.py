"""What torch.compile needs from the layers: a snapshot the compiler cannot recompute, and a
way to run a piece of Python at run time instead of tracing it.

`snapshot`: a training step reads the codebook, then updates it in place (EMA, dead codes).
AOTAutograd's partitioner may choose to recompute, in the backward, values the forward derived
from the codebook buffer (a gather, a clone): by then the buffer holds the updated codes, and
the gradients are silently wrong (inductor's min-cut partitioner does this). The snapshot is an
opaque custom op, which the partitioner never recomputes: the backward reads the saved copy.

`at_run_time`: a one-time state change that decides on the host (k-means init: is the codebook
initialized yet? then run k-means, and remember on the host that it ran) becomes an opaque op
in the graph that calls the owner's method when the graph runs. The method writes its results
into the state tensors it is handed (the op declares them mutated), and may change the owner's
Python attributes; a guard on such an attribute then retraces the graph without the op. So a
compiled step calls exactly the eager code, and a fullgraph compile needs no graph break.

`sums_by_index`: the statistics' scatter-add, opaque when compiled (see there).

`runs_eagerly`: under torch.compile the function runs eagerly, a graph break (an error under
fullgraph=True). Kept for the rare extras whose work is inherently eager (an optimizer step).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor


@torch.library.custom_op("vq_layers::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t):
    return torch.empty_like(t)


def _snapshot_backward(ctx, grad):
    return grad


_snapshot_op.register_autograd(_snapshot_backward)


def snapshot(t: Tensor) -> Tensor:
    """A copy of `t` (differentiable, gradient passed through) that a compiled backward reads
    as saved, never recomputed from `t`'s storage."""
    return _snapshot_op(t) if torch.compiler.is_compiling() else t.clone()


# id(owner) -> owner, for as long as it lives: the op's argument is a plain int
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_runtime_owner(owner) -> None:
    """Makes `owner`'s methods callable by `at_run_time`; call in __init__ and __setstate__ (a
    deepcopy or an unpickled copy is a new owner)."""
    _OWNERS[id(owner)] = owner


@torch.library.custom_op("vq_layers::at_run_time", mutates_args=("state",))
def _at_run_time_op(owner: int, method: str, inputs: list[Tensor | None], state: list[Tensor]) -> Tensor:
    getattr(_OWNERS[owner], method)(inputs, state)
    return state[0].new_zeros((), dtype=torch.float32)


@_at_run_time_op.register_fake
def _(owner, method, inputs, state):
    return state[0].new_empty((), dtype=torch.float32)


def at_run_time(owner, method: str, inputs: list[Tensor | None], state: list[Tensor]) -> Tensor:
    """owner.<method>(inputs, state), which writes into the `state` tensors: a direct call when
    eager, an opaque op under torch.compile. Returns a zero fp32 scalar; add it to something
    the step returns (a loss), so that no compiler drops the op."""
    if torch.compiler.is_compiling():
        return _at_run_time_op(id(owner), method, inputs, state)
    getattr(owner, method)(inputs, state)
    return state[0].new_zeros((), dtype=torch.float32)


def _sums_by_index(index: Tensor, rows: Tensor, weights: Tensor, size: int) -> Tensor:
    sums = rows.new_zeros((size, rows.shape[1] + 1))
    sums[:, :-1].index_add_(0, index, rows)
    sums[:, -1].index_add_(0, index, weights)
    return sums


_sums_by_index_op = torch.library.custom_op("vq_layers::sums_by_index", _sums_by_index, mutates_args=())


@_sums_by_index_op.register_fake
def _(index, rows, weights, size):
    return rows.new_empty((size, rows.shape[1] + 1))


def sums_by_index(index: Tensor, rows: Tensor, weights: Tensor, size: int) -> Tensor:
    """index (n,) in [0, size), rows (n, d), weights (n,) -> (size, d + 1): per index, the sum of
    its rows and (last column) of its weights; no gradient. Compiled, an opaque op: inductor's
    CPU code for a scatter-add fused with its neighbours (vectorized atomic adds) miscomputed
    the EMA statistics (torch 2.13)."""
    fn = _sums_by_index_op if torch.compiler.is_compiling() else _sums_by_index
    return fn(index, rows, weights, size)


def runs_eagerly(reason: str):
    """Decorator: under torch.compile the function runs eagerly, a graph break (an error under
    fullgraph=True). torch._dynamo is imported only then: importing it in every process (a
    torch.compiler.disable at import) costs a second and hangs DDP workers at exit."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if torch.compiler.is_compiling():
                return torch.compiler.disable(fn, reason=reason)(*args, **kwargs)
            return fn(*args, **kwargs)
        return run
    return wrap
