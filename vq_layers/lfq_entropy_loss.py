"""LFQ's two entropy terms over the global batch, from the kernels' exact per-process ops.

The kernels (kernels/lfq_entropy.py) give, for this process's tokens, each token's entropy over
the 2^d codes (`binary_entropy`, per bit) and the summed code probabilities (`code_mass`). The
loss terms are means over the whole batch, so under torch.distributed the sums and the token
count are added over the ranks (distributed.py, differentiably: every rank's logits get the
gradient of the global entropies) before anything is divided or logged. That reduction, and
the entropy of the mean distribution, live here rather than in the kernels: a kernel is a pure
op on its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_sum, all_reduce_sum_
from .kernels.lfq_entropy import binary_entropy, code_mass

# an overflowed logit (inf) would give 0 * inf = NaN entropies; past |l| = 1e4 every
# probability and gradient involved is exp(-1e4) = 0 in fp32 anyway
LOGIT_LIMIT = 1e4


def lfq_entropy(logits: Tensor, process_group=None, sync: bool = True,
                keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(per-sample entropy, codebook entropy), exact, from bit logits (n, c, d) in fp32.

    keep (n,) bool, or None for all: only the kept tokens count (as if the others were not
    there; they get a zero gradient). Selected in place, not by boolean indexing: no host sync.

    per-sample: mean over tokens and codebooks of each token's entropy over the 2^d codes;
    codebook: mean over codebooks of the entropy of the batch's mean code distribution.
    Under torch.distributed (and `sync`) both are over the global batch (tokens of all ranks),
    with gradients reaching every rank's logits; `sync=False` keeps them to this rank's tokens
    and issues no collective. No tokens anywhere: both are zero.
    """
    def over_ranks(t: Tensor) -> Tensor:  # differentiable sum over the group, or t alone
        return all_reduce_sum(t, process_group) if sync else t

    n, c, _ = logits.shape
    logits = logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    token_entropy = binary_entropy(logits)  # (n, c, d)
    if keep is None:
        count = torch.tensor([float(n)], device=logits.device)
    else:
        count = keep.sum().to(torch.float32).reshape(1)
        token_entropy = torch.where(keep[:, None, None], token_entropy, 0.0)
    total = (all_reduce_sum_(count, process_group) if sync else count).clamp(min=1)  # no gradient
    per_sample = over_ranks(token_entropy.sum()) / (total * c)
    mass = over_ranks(code_mass(logits, keep))  # (c, 2^d)
    probs = mass / total
    # 0 log 0 = 0 with a zero (not NaN) gradient for codes nobody uses
    codebook = -(probs * torch.where(probs > 0, probs, 1.0).log()).sum(-1).mean()
    return per_sample.squeeze(0), codebook
