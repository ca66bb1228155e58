"""k-means codebook init and row sampling that end the same on every rank, with static shapes.

`sample_rows` draws rows uniformly without replacement from the kept rows of the union of the
ranks' batches: every kept row gets a pseudo-random key (counter_random.py: hashed from the
caller's seed, the first rank's, and the row's position in the concatenated batch; the
codebook draws its seeds from a counter, so no step touches torch's generator and a compiled
step draws what an eager one does: `draw_rows`), each rank keeps its `num`
best keys, the ranks' candidates are gathered (a fixed size), and the `num` best keys of the
union win. The best keys of the union are among each rank's best, so every rank computes the
draw one process would make on the concatenated batch. No host sync, no data-dependent shape:
it traces under torch.compile(fullgraph=True), and dead-code revival (dead_codes.py) runs it
every step.

Lloyd iterations reduce per-code counts and sums over the ranks (code_statistics), so the means
are those of the global batch. `kmeans_init_` writes the result into a codebook's state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .counter_random import GOLDEN, MASK32, counter_hash, mix32
from .distributed import all_gather_stacked, rank_in
from .ema import code_statistics, normalized_codebook
from .kernels.nearest_code import nearest_code
from .precision import fp32_island


@torch.no_grad()
def sample_rows(x: Tensor, keep: Tensor | None, num: int, seed: Tensor, sync: bool = False,
                group=None) -> tuple[Tensor, Tensor]:
    """x (h, n, d), keep (h, n) bool or None, seed a 0-dim int64 in [0, 2^32) -> rows (h, num, d),
    valid (h, num) bool.

    Per codebook, `num` rows drawn uniformly without replacement from the kept rows (the
    union of the ranks' under `sync`), in random order; when there are fewer, the first ones
    are all of them and `valid` is False for the rest (whose rows are zeros). A kept row's key
    is hashed from the seed and its position among the kept rows of the global batch (the
    ranks' batches concatenated in rank order; under sync the seed is the first rank's): the
    draw is exactly that of one process on the concatenated batch, and masked rows change
    nothing.
    """
    h, n, d = x.shape
    kept = torch.ones(h, n, dtype=torch.bool, device=x.device) if keep is None else keep
    position = kept.long().cumsum(1) - 1  # (h, n): rank among this codebook's kept rows here
    seed = seed.to(x.device)
    if sync:  # the first rank's seed, and this rank's offset in the concatenated batch
        counts = all_gather_stacked(torch.cat([kept.sum(1), seed.reshape(1)]), group)  # (world, h + 1)
        seed = counts[0, h]
        position = position + counts[: rank_in(group), :h].sum(0).unsqueeze(1)
    stream = mix32((seed + torch.arange(h, device=x.device) * GOLDEN) & MASK32)  # one stream per codebook
    keys = torch.where(kept, counter_hash(stream.unsqueeze(1), position), -1)  # kept: [0, 2^32), others -1
    take = min(num, n)
    keys, picks = keys.topk(take, dim=1)
    rows = x.gather(1, picks.unsqueeze(-1).expand(-1, -1, d))
    if take < num:  # static padding to `num` candidates, all invalid
        keys = torch.cat([keys, keys.new_full((h, num - take), -1)], dim=1)
        rows = torch.cat([rows, rows.new_zeros((h, num - take, d))], dim=1)
    rows = torch.where((keys >= 0).unsqueeze(-1), rows, 0.0)  # (padding may hold NaN)
    if sync:  # each rank's best `num`, gathered in rank order: (h, world * num)
        keys = all_gather_stacked(keys, group).transpose(0, 1).reshape(h, -1)
        rows = all_gather_stacked(rows, group).transpose(0, 1).reshape(h, -1, d)
        keys, picks = keys.topk(num, dim=1)
        rows = rows.gather(1, picks.unsqueeze(-1).expand(-1, -1, d))
    return rows, keys >= 0


def draw_rows(x: Tensor, keep: Tensor | None, num: int, seed: Tensor, step: Tensor, sync: bool = False,
              group=None) -> tuple[Tensor, Tensor]:
    """sample_rows with the draw `step` of the counter stream `seed` (a CounterDraws' tensors, or
    the copy of `step` a compiled graph hands its run-time op). `step` advances in place only when
    rows were drawn: an empty or all-masked batch, or a stage that quantize dropout runs masked,
    changes nothing (as an eager step that skips the stage)."""
    rows, valid = sample_rows(x, keep, num, counter_hash(seed, step), sync, group)
    step.add_(valid.any().long())
    return rows, valid


@fp32_island
@torch.no_grad()
def kmeans(x: Tensor, keep: Tensor | None, rows: Tensor, valid: Tensor, iters: int, metric: str,
           sync: bool = False, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """x (h, n, d) per codebook, keep (h, n) bool or None, and k rows drawn from them (rows
    (h, k, d), valid (h, k): sample_rows') -> means (h, k, d), counts (h, k) of the last
    assignment, found (h,) bool: whether codebook h had any kept row (on any rank).

    The means start from the drawn rows (repeated in their random order when there are fewer
    rows than clusters); an empty cluster stays put. metric "dot" is spherical k-means (cosine
    codebooks): means are renormalized.
    """
    h, _, d = x.shape
    num_clusters = rows.shape[1]
    available = valid.sum(-1, keepdim=True)  # (h, 1)
    slots = torch.arange(num_clusters, device=x.device) % available.clamp(min=1)
    means = rows.gather(1, slots.unsqueeze(-1).expand(-1, -1, d))
    counts = means.new_zeros((h, num_clusters))
    for _ in range(iters):
        indices, _ = nearest_code(x, means, metric, valid=keep)
        counts, sums = code_statistics(x, indices, num_clusters, keep, sync, group)
        new_means = sums / counts.clamp(min=1).unsqueeze(-1)
        if metric == "dot":
            new_means = F.normalize(new_means, dim=-1)
        means = torch.where((counts > 0).unsqueeze(-1), new_means, means)  # an empty cluster stays put
    return means, counts, available[:, 0] > 0


@torch.no_grad()
def kmeans_init_(state: list[Tensor], x: Tensor, keep: Tensor | None, iters: int, metric: str, eps: float,
                 seed: Tensor, sync: bool = False, group=None) -> None:
    """k-means init of a codebook's state, in place: state = [embed (h, k, d) (a buffer, or a
    parameter written through .data), embed_avg (h, k, d), cluster_size (h, k), initted (), step
    ()] (seed, step: the row draws' counter stream), from x (h, n, d) fp32, keep (h, n) or None.
    The codes are the means, the statistics their counts and sums. Nothing changes unless every
    codebook has a kept row (on some rank): the codebook stays uninitialized until a batch has
    some. Branch-free (no host sync)."""
    embed, embed_avg, cluster_size, initted, step = state
    rows, valid = draw_rows(x, keep, cluster_size.shape[-1], seed, step, sync, group)
    means, counts, found = kmeans(x, keep, rows, valid, iters, metric, sync, group)
    ok = found.all()
    sums = means * counts.unsqueeze(-1)
    codes = normalized_codebook(counts, sums, eps, metric == "dot")
    cluster_size.copy_(torch.where(ok, counts, cluster_size))
    embed_avg.copy_(torch.where(ok, sums, embed_avg))
    embed.data.copy_(torch.where(ok, codes, embed.float()).to(embed.dtype))
    initted.copy_(initted | ok)
