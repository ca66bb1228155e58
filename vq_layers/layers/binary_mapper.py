"""Binary mapper (Fleuret, arXiv 2510.17558): bit logits -> a one-hot over 2^bits codes.

Each token carries `bits` independent Bernoulli logits; a code is the sampled bit pattern, bit
i worth 2^i (least significant first, as vector-quantize-pytorch). Its probability factorizes:

    log p(k | token) = sum_i [b_ki logsigmoid(l_i) + (1 - b_ki) logsigmoid(-l_i)]

so log-probabilities and the entropy run per bit in fp32, O(N·bits). Only the one-hot output
(the API) and its straight-through surrogate are (N, 2^bits); the surrogate is built one bit at
a time from those sums, with no (N, 2^bits, bits) tensor.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import MAX_MATERIALIZED_ELEMENTS, check_indices, check_positive_int
from ..kernels.lfq_entropy import binary_entropy, logsigmoid
from ..non_finite import NO_CODE, mark_losses, mark_non_finite, non_finite_tokens
from ..precision import fp32_island
from ..straight_through import straight_through as exact_straight_through

NAT = math.log(2)  # one bit, in nats
MAX_BITS = 62  # an int64 index holds the bit pattern


@fp32_island
def code_log_probs(logits: Tensor) -> Tensor:
    """log p(code) for all 2^bits codes: (n, bits) -> (n, 2^bits), fp32.

    Built bit by bit: after bits 0..i the table holds the 2^(i+1) partial sums, and bit i+1
    (worth 2^(i+1)) appends a copy shifted by its set side. Exact fp32 sums of non-positive terms.
    """
    pos, neg = logsigmoid(logits), logsigmoid(-logits)
    table = logits.new_zeros(logits.shape[0], 1)
    for i in range(logits.shape[-1]):
        table = torch.cat([table + neg[:, i : i + 1], table + pos[:, i : i + 1]], dim=-1)
    return table


class BinaryMapper(nn.Module):
    """Maps bit logits to a one-hot code with a straight-through gradient.

    Args (vector-quantize-pytorch's):
        bits: bits per token; codes = 2^bits.
        kl_loss_threshold: the aux loss is relu(KL(p || uniform) - threshold) per token, in nats
            (default: one bit, ln 2).
        deterministic_on_eval: in eval, take each bit's likely side instead of sampling.
        max_one_hot_elements (extra): forward refuses (ValueError) a one-hot output of more
            than this many values (tokens x 2^bits) rather than attempt it; default 2^31 (8 GiB
            per fp32 (N, 2^bits) tensor, of which a training forward holds about four); None
            for no limit.

    Shapes:
        forward(logits): logits (..., bits)
            -> (one_hot (..., 2^bits) in logits' dtype, [indices (...) int64,] aux loss fp32
                (scalar, or (...) with reduce_aux_kl_loss=False)).
        log_prob(logits, indices=(...) | one_hot=(..., 2^bits)) -> (...) fp32, or (..., bits)
            with sum_bits=False.
        A token with a non-finite logit gets index -1, a NaN one-hot row and a NaN aux loss
        (docs/precision.md).

    log_prob and calc_aux_loss need no one-hot and work at any size (up to 62 bits).
    """

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False,
                 max_one_hot_elements: int | None = 2**31):
        super().__init__()
        bits = check_positive_int("bits", bits)
        if bits > MAX_BITS:
            raise ValueError(f"bits: expected at most {MAX_BITS} (codes are int64 indices), got {bits}")
        if isinstance(kl_loss_threshold, bool) or not isinstance(kl_loss_threshold, numbers.Real):
            raise TypeError(f"kl_loss_threshold: expected a number (nats), got {type(kl_loss_threshold).__name__}")
        if max_one_hot_elements is not None:
            max_one_hot_elements = check_positive_int("max_one_hot_elements", max_one_hot_elements)
        self.max_one_hot_elements = max_one_hot_elements
        self.bits = bits
        self.num_codes = 2**bits
        self.kl_loss_threshold = float(kl_loss_threshold)
        self.deterministic_on_eval = deterministic_on_eval
        self.register_buffer("power_two", 2 ** torch.arange(bits, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, num_codes={self.num_codes}, kl_loss_threshold={self.kl_loss_threshold:.4g}, "
                f"deterministic_on_eval={self.deterministic_on_eval}, max_one_hot_elements={self.max_one_hot_elements}")

    # bits <-> indices

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """indices (...) -> bits (..., bits) bool, bit i worth 2^i."""
        check_indices(indices, self.num_codes)
        return (indices.long().unsqueeze(-1) & self.power_two) != 0

    @property
    def codes(self) -> Tensor:
        """Bit patterns of all codes (2^bits, bits) bool (the peer's buffer), built on demand."""
        if self.num_codes * self.bits > MAX_MATERIALIZED_ELEMENTS:
            raise ValueError(f"codes: {self.num_codes} codes x {self.bits} bits is too large to build; "
                             "call indices_to_bits on the indices you need")
        return self.indices_to_bits(torch.arange(self.num_codes, device=self.power_two.device))

    def _check_logits(self, logits) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            got = getattr(logits, 'dtype', type(logits).__name__)
            raise TypeError(f"logits: expected a floating point tensor, got {got}")
        if logits.ndim == 0 or logits.shape[-1] != self.bits:
            raise ValueError(f"logits: expected a last dim of bits={self.bits}, got shape {tuple(logits.shape)}")

    # losses and probabilities (fp32)

    def binary_entropy(self, logits: Tensor) -> Tensor:
        """Entropy of the code distribution in nats: logits (..., bits) -> (...), fp32."""
        self._check_logits(logits)
        return fp32_island(lambda t: binary_entropy(t).sum(-1))(logits)

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        """relu(bits·ln2 - H(p) - kl_loss_threshold): mean over tokens (fp32 scalar, 0 for no
        tokens), or per token (...) fp32; NaN for a token with a non-finite logit (so the mean
        is NaN with one)."""
        kl = self.bits * NAT - self.binary_entropy(logits)
        bad = non_finite_tokens(logits)
        loss = mark_non_finite(F.relu(kl - self.kl_loss_threshold), bad)
        if not reduce_aux_kl_loss:
            return loss
        return mark_losses(loss.sum() / max(loss.numel(), 1), bad)

    def log_prob(self, logits: Tensor, *, indices: Tensor | None = None, one_hot: Tensor | None = None,
                 sum_bits: bool = True) -> Tensor:
        """log p(code | logits) of given codes (indices, or one-hot rows: their argmax), fp32;
        NaN for index -1 (no code) and for a token with a non-finite logit."""
        self._check_logits(logits)
        if (indices is None) == (one_hot is None):
            raise ValueError("log_prob: expected exactly one of indices or one_hot, got "
                             f"{'both' if indices is not None else 'neither'}")
        if one_hot is not None:
            if not isinstance(one_hot, Tensor):
                raise TypeError(f"one_hot: expected a tensor, got {type(one_hot).__name__}")
            if one_hot.ndim == 0 or one_hot.shape[-1] != self.num_codes:
                raise ValueError(f"one_hot: expected a last dim of {self.num_codes}, got shape {tuple(one_hot.shape)}")
            indices = one_hot.argmax(dim=-1)
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices: expected an integer tensor, got {type(indices).__name__}")
        if tuple(indices.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"indices: expected shape {tuple(logits.shape[:-1])} (the logits' leading dims), "
                             f"got {tuple(indices.shape)}")
        check_indices(indices, self.num_codes, allow_dropped=True)
        bits = (indices.long().clamp(min=0).unsqueeze(-1) & self.power_two) != 0
        per_bit = fp32_island(lambda t: torch.where(bits, logsigmoid(t), logsigmoid(-t)))(logits)
        per_bit = mark_non_finite(per_bit, (indices == NO_CODE) | non_finite_tokens(logits))
        return per_bit.sum(-1) if sum_bits else per_bit

    @fp32_island
    def _sample_bits(self, logits: Tensor, temperature: float, deterministic: bool) -> Tensor:
        if deterministic:  # sigmoid(l / T) > 1/2 exactly when l > 0
            return logits > 0
        return torch.rand_like(logits) < torch.sigmoid(logits / temperature)

    def forward(self, logits: Tensor, temperature: float = 1.0, straight_through: bool | None = None,
                calc_aux_loss: bool | None = None, deterministic: bool | None = None,
                return_indices: bool = False, reduce_aux_kl_loss: bool = True):
        self._check_logits(logits)
        if not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        lead = logits.shape[:-1]
        flat = rearrange(logits, "... bits -> (...) bits")
        bad = non_finite_tokens(flat)
        limit = self.max_one_hot_elements
        if limit is not None and flat.shape[0] * self.num_codes > limit:
            raise ValueError(
                f"max_one_hot_elements: the one-hot output of {flat.shape[0]} tokens x 2^{self.bits} codes would "
                f"hold {flat.shape[0] * self.num_codes:.3g} values, over the limit of {limit:.3g}; raise it "
                "(BinaryMapper(..., max_one_hot_elements=None) for none), or use fewer tokens or bits, or "
                "log_prob / calc_aux_loss, which need no one-hot"
            )
        indices = (self._sample_bits(flat, float(temperature), deterministic).long() * self.power_two).sum(-1)
        one_hot = flat.new_zeros(flat.shape[0], self.num_codes).scatter_(-1, indices.unsqueeze(-1), 1.0)
        if straight_through and logits.requires_grad and torch.is_grad_enabled():
            # value: the one-hot exactly; gradient: that of p(code | logits) at temperature 1
            # (the (N, 2^bits) probability table is built only when a gradient can flow)
            one_hot = exact_straight_through(one_hot, code_log_probs(flat).exp())

        if calc_aux_loss:  # NaN at a non-finite token (reduced: NaN with one)
            aux_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss=reduce_aux_kl_loss)
        else:
            aux_loss = mark_losses(logits.new_zeros((), dtype=torch.float32), bad)

        one_hot = mark_non_finite(one_hot, bad).reshape(*lead, self.num_codes)
        indices = mark_non_finite(indices, bad).reshape(lead)
        return (one_hot, indices, aux_loss) if return_indices else (one_hot, aux_loss)

