"""Dead-code revival: a code whose EMA count fell below a threshold takes a vector of the batch.

A code no vector chooses gets no EMA pull and stays where it is, unused for good. Reviving it
at a row of this batch (drawn as k-means' rows are, kmeans.draw_rows: the union of the ranks'
kept rows under sync, the same draw on every rank) puts it where the data is; its statistics
restart from that row, so the next EMA step does not pull it back to where it died.

Branch-free (no host sync, static shapes, so it traces under torch.compile(fullgraph=True) and
runs every training step): a row is drawn for every code and taken where the code is dead;
with fewer rows than dead codes, the lowest-index dead codes take them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kmeans import draw_rows


@torch.no_grad()
def revive_dead_codes_(embed: Tensor, embed_avg: Tensor, cluster_size: Tensor, x: Tensor, keep: Tensor | None,
                       threshold: float, reset: float, cosine: bool, seed: Tensor, step: Tensor,
                       sync: bool = False, group=None) -> Tensor:
    """Revives, in place, the codes with cluster_size < threshold -> how many were revived (0-dim
    int64).

    embed (h, k, d) (a buffer, or a parameter written through .data), embed_avg (h, k, d) and
    cluster_size (h, k) fp32: the codebook's state; x (h, n, d) fp32 in the codes' frame, keep
    (h, n) bool or None; a revived code becomes its row (normalized when `cosine`), with count
    `reset` and sum `reset` * row. seed, step: the row draws' counter stream (draw_rows).
    Under sync the statistics, hence the dead codes, are the same on every rank.
    """
    dead = cluster_size < threshold
    rows, valid = draw_rows(x, keep, cluster_size.shape[-1], seed, step, sync, group)  # (h, k, d), (h, k)
    slot = (dead.long().cumsum(-1) - 1).clamp(min=0)  # a dead code's rank among the dead ones
    new = rows.gather(1, slot.unsqueeze(-1).expand_as(rows))
    revive = dead & valid.gather(1, slot)
    if cosine:
        new = F.normalize(new, dim=-1)
    embed.data.copy_(torch.where(revive.unsqueeze(-1), new, embed.float()).to(embed.dtype))
    embed_avg.copy_(torch.where(revive.unsqueeze(-1), new * reset, embed_avg))
    cluster_size.copy_(torch.where(revive, reset, cluster_size))
    return revive.sum()
