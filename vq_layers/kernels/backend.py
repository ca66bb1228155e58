"""Which implementation runs a kernel op: the pure-torch reference or the Triton kernel.

Chosen per call (so an op registered with torch.library decides at run time, not at trace time)
from an explicit `backend` argument or the VQ_LAYERS_BACKEND environment variable:
- "auto" (default): Triton for CUDA tensors when triton imports, torch otherwise;
- "torch": always the reference;
- "triton": always the kernel; CPU tensors only under the interpreter (TRITON_INTERPRET=1, set
  before triton is first imported), where it serves to test the kernels, slowly.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV = "VQ_LAYERS_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str | None) -> str:
    """The backend named by the argument, or else by VQ_LAYERS_BACKEND, validated."""
    name = "backend" if backend else ENV
    backend = backend or os.environ.get(ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """Whether an op on tensors of `device` runs its Triton kernel."""
    backend = check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_importable()
    if not triton_importable():
        raise RuntimeError("backend 'triton' was asked for but triton cannot be imported (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend 'triton': expected CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got tensors on {device}")
    return True
