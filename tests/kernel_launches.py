"""Counts the Triton kernels' host calls: a test can tell a kernel ran from a torch fallback."""

from __future__ import annotations

import vq_layers.kernels.triton_lfq_entropy as triton_lfq
import vq_layers.kernels.triton_nearest_code as triton_search

KERNELS = ((triton_search, "search"), (triton_lfq, "code_mass"), (triton_lfq, "bit_sums"))


def count_launches(monkeypatch) -> dict[str, int]:
    """Wraps every kernel's launcher for the test: {"search": n, "code_mass": n, "bit_sums": n}."""
    counts = {name: 0 for _, name in KERNELS}
    for module, name in KERNELS:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts
