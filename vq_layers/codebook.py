"""A learned codebook and its statistics: EMA update, k-means init, dead-code replacement.

State (names as vector-quantize-pytorch's `_codebook`, so checkpoints load both ways):
    embed (h, k, d)        the codes: an fp32 buffer, or a parameter when learnable
    embed_avg (h, k, d)    EMA of the per-code sums of the vectors that chose each code, fp32
    cluster_size (h, k)    EMA of the per-code counts, fp32
    initted ()             False until k-means init ran
The statistics stay float32 under `.half()`/`.bfloat16()` (Fp32BuffersModule).

Under sync, the first training step broadcasts this state from the group's first rank, so
ranks that built the layer from different seeds (no DDP to broadcast it) start alike; from then
on every rank applies the same all-reduced update.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import broadcast_, first_rank, shared_generator
from .ema import (
    code_statistics,
    ema_update_,
    normalized_codebook,
    smoothed_cluster_size,
)
from .kmeans import draw_rows, kmeans, offered_rows
from .precision import Fp32BuffersModule, fp32_island

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed support
    DTensor = ()


KMEANS_INIT_EAGER = ("kmeans_init=True: k-means runs once, eagerly, on the first training batch; compile with "
                     "fullgraph=False, or run one training step before compiling with fullgraph=True")


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


class Codebook(Fp32BuffersModule):
    def __init__(self, dim: int, codebook_size: int, num_codebooks: int = 1, *, kmeans_init: bool = False,
                 kmeans_iters: int = 10, decay: float = 0.8, eps: float = 1e-5, threshold_ema_dead_code: float = 0,
                 reset_cluster_size: float | None = None, learnable: bool = False, use_cosine_sim: bool = False):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, num_codebooks
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.learnable, self.use_cosine_sim = learnable, use_cosine_sim
        self.metric = "dot" if use_cosine_sim else "l2"

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim, dtype=torch.float32))
            if use_cosine_sim:
                embed = F.normalize(embed, dim=-1)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_fp32_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_fp32_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_fp32_buffer("embed", embed)
        # dead codes replaced by the last update (health statistic; not state)
        self.dead_codes_replaced = torch.zeros((), dtype=torch.long)
        self._state_broadcast = False  # per process: has a synced step made the ranks' state one?
        self._know_initted(not kmeans_init)  # `initted` known True on the host (see needs_init)

    def extra_repr(self) -> str:
        return f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, dim={self.dim}"

    def codes(self) -> Tensor:
        """The codes in fp32 (h, k, d); differentiable when learnable.

        A learnable codebook that FSDP2 holds sharded (outside its forward) is all-gathered under
        no_grad (every rank must call); with gradients that would be wrong, and raises."""
        self.keep_fp32_buffers_()
        if not self.learnable:
            return self.embed.detach()
        embed = self.embed
        if isinstance(embed, DTensor):
            if torch.is_grad_enabled():
                # full_tensor's backward keeps each rank's own gradient slice: no reduce-scatter
                raise ValueError(
                    "learnable_codebook: the codebook is still sharded here (FSDP2 unshards it only around "
                    "the forward of the module fully_shard wraps, and Codebook has none): shard the layer "
                    "or a parent, not its Codebook, and decode with gradients inside that forward (or "
                    "under torch.no_grad())")
            embed = embed.full_tensor()
        return embed.float()

    def _under_fsdp(self) -> bool:
        """FSDP (1 or 2) manages this module (its mark) or holds the codebook sharded (DTensor)."""
        return getattr(self, "_is_fsdp_managed_module", False) or isinstance(self.embed, DTensor)

    def _check_in_place_write(self, what: str) -> None:
        """FSDP (1 and 2) hands forward an unsharded copy of each parameter, rebuilt from the
        shards at every all-gather: an in-place write to a learnable codebook would be undone
        silently, and shards could disagree. Raised on every rank alike (it depends on the
        configuration only), before anything changed."""
        if self.learnable and self._under_fsdp():
            raise ValueError(
                f"learnable_codebook: {what} rewrites the codebook in place, but FSDP shards it (a "
                "parameter when learnable_codebook=True or orthogonal_reg_weight > 0) and would undo the "
                "write at the next all-gather. Under FSDP use an EMA codebook (learnable_codebook=False, "
                "orthogonal_reg_weight=0), or a learnable one with ema_update=False, kmeans_init=False and "
                "threshold_ema_dead_code=0; k-means init can run before wrapping (one training forward per "
                "rank, then fully_shard)")

    def needs_init(self) -> bool:
        """Whether k-means init is still to run. Asks the `initted` buffer (a host sync, a graph
        break under torch.compile) until it is known True; from then on a Python flag answers, so
        a compiled step after init has neither. init_, set_codes_ and load_state_dict keep the
        flag; an eager call notices any other write to the buffer by its version (broadcast_state_,
        DDP's buffer broadcast, a user's `initted.fill_(False)`) and asks again."""
        if (self._known_initted and not torch.compiler.is_compiling()
                and self.initted._version != self._initted_version):
            self._known_initted = False
        if not self._known_initted:
            self._know_initted(self._read_initted())
        return not self._known_initted

    def _know_initted(self, value: bool) -> None:
        self._known_initted, self._initted_version = value, self.initted._version

    @runs_eagerly(KMEANS_INIT_EAGER)
    def _read_initted(self) -> bool:
        return bool(self.initted)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # `initted` may have changed: read it now (loading is eager), so a compiled forward after
        # loading a checkpoint need not; a meta buffer (not materialized yet) is asked later
        self._know_initted(not self.initted.is_meta and bool(self.initted))

    @torch.no_grad()
    def broadcast_state_(self, group=None, once: bool = False) -> None:
        """Every rank takes the group's first rank's state (one collective); with `once`, only
        the first time in this process (the first synced step). A codebook parameter under FSDP
        is skipped: its shards are the truth."""
        if once and self._state_broadcast:
            return
        self.keep_fp32_buffers_()
        tensors = [self.embed_avg, self.cluster_size, self.initted]
        if not (self.learnable and self._under_fsdp()):
            tensors.append(self.embed)
        flat = broadcast_(torch.cat([t.detach().reshape(-1).float() for t in tensors]), first_rank(group), group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.data.copy_(part.reshape(t.shape).to(t.dtype))
        self._state_broadcast = True  # (`initted` changed version: needs_init reads it again)

    @torch.no_grad()
    def set_codes_(self, codes: Tensor) -> None:
        """New codes (h, k, d); the EMA sums follow so the next EMA step starts from them."""
        self.keep_fp32_buffers_()
        self._check_in_place_write("setting the codebook")
        codes = codes.to(torch.float32)
        self.embed.data.copy_(codes)
        self.embed_avg.copy_(codes * smoothed_cluster_size(self.cluster_size, self.eps).unsqueeze(-1))
        self.initted.fill_(True)
        self._know_initted(True)

    @fp32_island
    @torch.no_grad()
    def init_(self, samples: list[Tensor], sync: bool, group=None) -> None:
        """k-means on the first batch: samples per codebook (n_h, d), unmasked only."""
        self.keep_fp32_buffers_()
        self._check_in_place_write("kmeans_init")
        generator = shared_generator(samples[0].device, group, sync)
        found = kmeans(samples, self.codebook_size, self.kmeans_iters, self.metric, generator, sync, group)
        if found is None:  # no vectors anywhere: stay uninitialized until a batch has some
            return
        means, counts = found
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self.embed.data.copy_(means)
        self._refresh()
        self.initted.fill_(True)
        self._know_initted(True)

    def _refresh(self) -> None:
        self.embed.data.copy_(normalized_codebook(self.cluster_size, self.embed_avg, self.eps, self.use_cosine_sim))

    @fp32_island
    @torch.no_grad()
    def update_(self, x: Tensor, indices: Tensor, keep: Tensor | None, ema_update: bool,
                sync: bool, group=None) -> None:
        """One training step's update from x (h, n, d) that chose indices (h, n), keep (h, n) or None.

        EMA statistics (when ema_update or dead-code replacement needs them), the codebook they
        describe, then dead codes revived from this batch's vectors.
        """
        self.dead_codes_replaced = torch.zeros((), dtype=torch.long, device=x.device)
        if not ema_update and self.threshold_ema_dead_code <= 0:
            return
        self.keep_fp32_buffers_()
        self._check_in_place_write("threshold_ema_dead_code" if not ema_update else "the EMA update")
        counts, sums = code_statistics(x, indices, self.codebook_size, keep, sync, group)
        ema_update_(self.cluster_size, self.embed_avg, counts, sums, self.decay)
        if ema_update:
            self._refresh()
        if self.threshold_ema_dead_code > 0:
            self._replace_dead_codes(x, keep, sync, group)

    @runs_eagerly("threshold_ema_dead_code > 0: dead-code replacement runs eagerly (its sizes depend on the "
                  "data), a graph break; compile with fullgraph=False")
    def _replace_dead_codes(self, x: Tensor, keep: Tensor | None, sync: bool, group) -> None:
        """Codes whose EMA count fell below the threshold take vectors drawn from this batch (the
        union of the ranks'), and their statistics restart from that vector, so the next EMA
        step does not pull them back to where they died."""
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank when synced
        if not bool(dead.any()):
            return
        generator = shared_generator(x.device, group, sync)
        replaced = 0
        for h in range(self.num_codebooks):
            dead_h = dead[h].nonzero().squeeze(-1)
            if dead_h.numel() == 0:
                continue
            rows = x[h] if keep is None else x[h][keep[h]]
            pool = offered_rows(rows, dead_h.numel(), sync, group)
            if pool.shape[0] == 0:
                continue
            if pool.shape[0] < dead_h.numel():  # fewer vectors than dead codes: revive a random subset
                dead_h = dead_h[torch.randperm(dead_h.numel(), generator=generator, device=x.device)[:pool.shape[0]]]
            new = draw_rows(pool, dead_h.numel(), generator)
            if self.use_cosine_sim:
                new = F.normalize(new, dim=-1)
            self.embed.data[h, dead_h] = new.to(self.embed.dtype)
            self.embed_avg[h, dead_h] = new * self.reset_cluster_size
            self.cluster_size[h, dead_h] = float(self.reset_cluster_size)
            replaced += dead_h.numel()
        self.dead_codes_replaced = torch.tensor(replaced, device=x.device)
