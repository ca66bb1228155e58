"""Loading checkpoints of vector-quantize-pytorch (the peer) where a choice of ours changes codes.

A layer whose behaviour deliberately differs from the peer's in a way that changes a trained
model's codes records its choice in its state dict, written only when the choice is ours (so a
state dict with the peer's choice stays the peer's, loadable there). A state dict without the
record (the peer's, or ours from before the record existed: the two cannot be told apart) gets
the peer's behaviour, so a model trained there keeps its codes, and one warning says so, unless
the layer's keyword chose explicitly.

The layer implements `_falls_back(state_dict, prefix)` (loading takes the peer's choice without
having been told) and `_warn_unrecorded(layer, prefix)`; `_warn_on_load` is False when a
grouped layer warns for it.
"""

from __future__ import annotations

import warnings


def warn_unrecorded(layer: str, prefix: str, record: str, peer_choice: str, our_choice: str, keyword: str,
                    ours, peers) -> None:
    """One warning: `layer` at `prefix` takes the peer's `peer_choice`, as the checkpoint has no `record`."""
    where = f" ({prefix.rstrip('.')!r})" if prefix else ""
    warnings.warn(
        f"{layer}{where}: the checkpoint does not record its {record} (no vector-quantize-pytorch checkpoint "
        f"does, nor a vq_layers one saved before this record existed), so it takes vector-quantize-pytorch's "
        f"{peer_choice}, with which a model trained there keeps its codes. A checkpoint trained with "
        f"vq_layers' {our_choice} needs {keyword}={ours!r} at construction; {keyword}={peers!r} takes "
        "vector-quantize-pytorch's without this warning",
        UserWarning, stacklevel=2)


class GroupsWarnOnce:
    """Mixin for a grouped layer (`self.rvqs`): one warning for all its groups, not one each."""

    def _silence_groups(self) -> None:
        for rvq in self.rvqs:
            rvq._warn_on_load = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a module loads before its children: warn once if any group will take the peer's choice
        if any(rvq._falls_back(state_dict, f"{prefix}rvqs.{g}.") for g, rvq in enumerate(self.rvqs)):
            self.rvqs[0]._warn_unrecorded(type(self).__name__, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
