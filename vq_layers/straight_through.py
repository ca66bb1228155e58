"""Straight-through estimators whose forward value is exact.

The usual `z + (q - z).detach()` returns `z + (q - z)`, which in floating point is not always
`q`: outputs would then differ in the last bit from codes looked up by index. Here the value is
`q` exactly (`q + 0`) and the gradient is that of `z`.
"""

from torch import Tensor


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """Forward: `value` exactly. Backward: gradient flows into `surrogate` as if identity."""
    return value.detach() + (surrogate - surrogate.detach())
