"""A learned codebook: the owner of its state, and its updates (EMA, k-means init, dead codes).

State (names as vector-quantize-pytorch's `_codebook`, so its checkpoints load):
    embed (h, k, d)        the codes: an fp32 buffer, or a parameter when learnable
    embed_avg (h, k, d)    EMA of the per-code sums of the vectors that chose each code, fp32
    cluster_size (h, k)    EMA of the per-code counts, fp32
    initted ()             False until k-means init ran
    affine.*               with affine_param, the running moments that map the codes onto the
                           batch (affine.AffineFrame, a submodule); checkpoints that keep them on
                           the codebook itself (vector-quantize-pytorch's, vq_layers' before the
                           submodule) load: their keys gain the `affine.` prefix when loaded
While statistics are accumulated (`accum_ema_update`) and not applied yet, and only then:
    accum_cluster_size (h, k), accum_embed_sum (h, k, d) fp32 (so a checkpoint keeps them; a
    state dict without them loads as "nothing pending", and the default keys stay the peer's)
The statistics stay float32 under `.half()`/`.bfloat16()` (Fp32BuffersModule).

The numerics live in the floor below: ema.py (statistics), kmeans.py (init), dead_codes.py
(revival), affine.py (the frame). Under sync, the first training step broadcasts this state
from the group's first rank, so ranks that built the layer from different seeds (no DDP to
broadcast it) start alike; from then on every rank applies the same all-reduced update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .affine import INIT_FLAGS, MOMENTS, AffineFrame, nest_frame_keys_
from .compiling import at_run_time, register_runtime_owner, runs_eagerly
from .counter_random import CounterDraws
from .dead_codes import revive_dead_codes_
from .distributed import broadcast_once_, broadcast_tensors_, first_rank, fsdp_holds, unsharded
from .ema import (
    code_statistics,
    ema_update_,
    ema_weight,
    normalized_codebook,
    smoothed_cluster_size,
)
from .kmeans import kmeans_init_
from .precision import Fp32BuffersModule, fp32_island

ACCUMULATORS = ("accum_cluster_size", "accum_embed_sum")
STILL_SHARDED = (
    "learnable_codebook: the codebook is still sharded here (FSDP2 unshards it only around the forward of the "
    "module fully_shard wraps, and Codebook has none): shard the layer or a parent, not its Codebook, and "
    "decode with gradients inside that forward (or under torch.no_grad())")
UNDONE_BY_FSDP = (
    "learnable_codebook: {} rewrites the codebook in place, but FSDP shards it (a parameter when "
    "learnable_codebook=True or orthogonal_reg_weight > 0) and would undo the write at the next all-gather. "
    "Under FSDP use an EMA codebook (learnable_codebook=False, orthogonal_reg_weight=0), or a learnable one "
    "with ema_update=False, kmeans_init=False and threshold_ema_dead_code=0; k-means init can run before "
    "wrapping (one training forward per rank, then fully_shard)")


class Codebook(Fp32BuffersModule):
    """The state of h codebooks of k codes of dim d (see the module docstring) and the updates
    that write it. The layers call it; the numerics it runs live in the floor below."""

    def __init__(self, dim: int, codebook_size: int, num_codebooks: int = 1, *, kmeans_init: bool = False,
                 kmeans_iters: int = 10, decay: float = 0.8, eps: float = 1e-5, threshold_ema_dead_code: float = 0,
                 reset_cluster_size: float | None = None, learnable: bool = False, use_cosine_sim: bool = False,
                 manual_ema_update: bool = False, affine_param: bool = False, affine_param_batch_decay: float = 0.99,
                 affine_param_codebook_decay: float = 0.9, process_group=None):
        super().__init__()
        self.process_group = process_group  # k-means' collectives when run by the run-time op
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, num_codebooks
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.learnable, self.use_cosine_sim = learnable, use_cosine_sim
        self.metric = "dot" if use_cosine_sim else "l2"
        self.manual_ema_update, self.affine_param = manual_ema_update, affine_param

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
        self.affine = AffineFrame(num_codebooks, dim, affine_param_batch_decay,
                                  affine_param_codebook_decay) if affine_param else None
        for name in ACCUMULATORS:  # allocated by the first accumulating step, freed when applied
            self.register_buffer(name, None)
        # the seeds of k-means' and dead-code replacement's row draws: a counter (counter_random),
        # not torch's generator, so a compiled step draws what an eager one does; not state
        self.sample_draws = CounterDraws()
        # dead codes replaced by the last update (health statistic; not state)
        self.dead_codes_replaced = torch.zeros((), dtype=torch.long)
        self._broadcast = False  # per process: has a synced step made the ranks' state one?
        self._know_initted(not kmeans_init)  # `initted` known True on the host (see needs_init)
        register_runtime_owner(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        register_runtime_owner(self)  # a deepcopy or an unpickled copy

    def extra_repr(self) -> str:
        return (f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, dim={self.dim}"
                + (", affine_param=True" if self.affine_param else ""))

    def codes(self) -> Tensor:
        """The codes as searched, in fp32 (h, k, d); differentiable when learnable. With
        affine_param, mapped onto the running batch moments (affine.py).

        A learnable codebook that FSDP2 holds sharded (outside its forward) is all-gathered under
        no_grad (every rank must call); with gradients that would be wrong, and raises."""
        self.keep_fp32_buffers_()
        if not self.learnable:
            return self._to_batch_frame(self.embed.detach())
        return self._to_batch_frame(unsharded(self.embed, STILL_SHARDED).float())

    def keep_fp32_buffers_(self) -> None:
        super().keep_fp32_buffers_()
        if self.affine is not None:  # (a submodule whose forward never runs: no hook of its own fires)
            self.affine.keep_fp32_buffers_()

    def _to_batch_frame(self, codes: Tensor) -> Tensor:
        return codes if self.affine is None else self.affine.to_batch_frame(codes)

    def to_codebook_frame(self, x: Tensor) -> Tensor:
        """x (h, n, d) as searched -> the frame the codes and statistics live in (identity
        without affine_param)."""
        return x if self.affine is None else self.affine.to_codebook_frame(x)

    def update_affine_(self, x: Tensor, keep: Tensor | None, sync: bool, group=None) -> None:
        """One step of the running moments (AffineFrame.update_) from x (h, n, d) as searched,
        keep (h, n), and the codes before this step's update; nothing without affine_param."""
        if self.affine is not None:
            self.affine.update_(x, keep, self.embed.detach(), sync, group)

    def _sharded(self) -> bool:
        """A learnable codebook that FSDP (1 or 2) shards: its shards are the truth."""
        return self.learnable and fsdp_holds(self, self.embed)

    def _check_in_place_write(self, what: str) -> None:
        """FSDP (1 and 2) hands forward an unsharded copy of each parameter, rebuilt from the
        shards at every all-gather: an in-place write to a learnable codebook would be undone
        silently, and shards could disagree. Raised on every rank alike (it depends on the
        configuration only), before anything changed."""
        if self._sharded():
            raise ValueError(UNDONE_BY_FSDP.format(what))

    def needs_init(self) -> bool:
        """Whether k-means init may still have to run. Eagerly, asks the `initted` buffer (a host
        sync) until it is known True; from then on a Python flag answers, so a step after init
        has no sync. init_, set_codes_ and load_state_dict keep the flag; an eager call notices
        any other write to the buffer by its version (broadcast_state_, DDP's buffer broadcast,
        a user's `initted.fill_(False)`) and asks again. Under torch.compile the flag alone
        answers: the traced step then holds the init as a run-time op, which checks the buffer
        itself and sets the flag, and the flag's guard retraces the step without it."""
        if torch.compiler.is_compiling():
            return not self._known_initted
        if self._known_initted and self.initted._version != self._initted_version:
            self._known_initted = False
        if not self._known_initted:
            self._know_initted(bool(self.initted))
        return not self._known_initted

    @property
    def _state_broadcast(self) -> bool:
        """distributed.broadcast_once_'s flag. Setting it (after the broadcast) also forgets
        whether `initted` is known: the broadcast wrote it through .data, which bumps no
        version, so needs_init must read the first rank's value (once)."""
        return self._broadcast

    @_state_broadcast.setter
    def _state_broadcast(self, value: bool) -> None:
        self._broadcast = value
        self._known_initted = False

    def _know_initted(self, value: bool) -> None:
        self._known_initted, self._initted_version = value, self.initted._version

    def init_state(self) -> list[Tensor]:
        """What k-means init writes: embed, embed_avg, cluster_size, initted, the row-draw counter."""
        return [self.embed, self.embed_avg, self.cluster_size, self.initted, self.sample_draws.step]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.sample_draws.to_(self.cluster_size.device)  # (not buffers: moved here, never cast)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.affine is not None:  # (before the submodule loads: it takes the keys under its prefix)
            nest_frame_keys_(state_dict, prefix, "affine")
        for name in ACCUMULATORS:  # present in a checkpoint only while statistics are pending
            if prefix + name in state_dict and getattr(self, name) is None:
                like = self.cluster_size if name == ACCUMULATORS[0] else self.embed_avg
                self.register_fp32_buffer(name, torch.zeros_like(like, dtype=torch.float32))
            elif prefix + name not in state_dict:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # `initted` may have changed: read it now (loading is eager), so a compiled forward after
        # loading a checkpoint need not; a meta buffer (not materialized yet) is asked later
        self._know_initted(not self.initted.is_meta and bool(self.initted))

    def synced_state(self) -> list[Tensor]:
        """What the first synced step broadcasts: the statistics, the affine moments and the codes
        (a codebook parameter under FSDP excepted: its shards are the truth)."""
        self.keep_fp32_buffers_()
        tensors = [self.embed_avg, self.cluster_size, self.initted, self.sample_draws.seed]
        if self.affine is not None:
            tensors += self.affine.state()
        if not self._sharded():
            tensors.append(self.embed)
        return tensors

    @torch.no_grad()
    def broadcast_state_(self, group=None, once: bool = False) -> None:
        """Every rank takes the group's first rank's state (one collective); with `once`, only
        the first time in this process (the first synced step)."""
        if once:
            broadcast_once_([self], group)
        else:
            broadcast_tensors_(self.synced_state(), first_rank(group), group)
            self._known_initted = False  # (as the flag's setter: needs_init reads `initted` again)

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
    def init_(self, x: Tensor, keep: Tensor | None, sync: bool, group=None, state: list[Tensor] | None = None) -> None:
        """kmeans.kmeans_init_ from x (h, n, d) as searched, keep (h, n) or None, into `state`:
        init_state()'s tensors, or the copies a compiled graph hands its run-time op."""
        self.keep_fp32_buffers_()
        self._check_in_place_write("kmeans_init")
        kmeans_init_(self.init_state() if state is None else state, x, keep, self.kmeans_iters, self.metric,
                     self.eps, self.sample_draws.seed, sync, group)

    def init_if_needed(self, x: Tensor, keep: Tensor | None, sync: bool, local: bool = False) -> Tensor:
        """k-means init from x (h, n, d) as searched, keep (h, n) or None, unless the codebook is
        initialized (a run-time op under torch.compile: compiling.at_run_time) -> a zero to add
        to the step's loss. `local` (sync_kmeans=False): each rank runs k-means on its own data
        and the first rank's result wins, or later steps would diverge."""
        flags = torch.tensor([sync, local])
        return at_run_time(self, "_init_now", [x, keep, flags], self.init_state())

    def _init_now(self, inputs: list, state: list[Tensor]) -> None:
        x, keep, flags = inputs
        sync, local = flags.tolist()
        if not bool(state[3]):  # (compiled: the graph holds this op until the codebook is known initted)
            self.init_(x, keep, sync and not local, self.process_group, state)
            if sync and local:
                broadcast_tensors_(state, first_rank(self.process_group), self.process_group)
        self._know_initted(bool(state[3]))

    def _set_from_statistics(self) -> None:
        self.embed.data.copy_(normalized_codebook(self.cluster_size, self.embed_avg, self.eps, self.use_cosine_sim))

    @torch.no_grad()
    def update_ema(self) -> None:
        """Sets the codes to what the EMA statistics describe (embed_avg / smoothed cluster_size).
        Training steps do it themselves unless manual_ema_update=True (vector-quantize-pytorch's
        name; with sync every rank holds the same statistics, so calling it on every rank keeps
        them identical)."""
        self.keep_fp32_buffers_()
        self._check_in_place_write("update_ema")
        self._set_from_statistics()

    @fp32_island
    @torch.no_grad()
    def update_(self, x: Tensor, indices: Tensor, keep: Tensor | None, ema_update: bool,
                sync: bool, group=None, weight=None, accumulate: bool = False) -> None:
        """One training step's update from x (h, n, d) (as searched) that chose indices (h, n),
        keep (h, n) or None: EMA statistics (when ema_update or dead-code revival needs them),
        the codebook they describe (unless manual_ema_update), then dead codes revived from this
        batch's vectors. `weight`: the per-code `ema_update_weight`, as ema.ema_weight returns it
        (checked), or a callable, evaluated and checked here. With `accumulate`, this step's
        statistics are only added to the pending ones; the next step applies them all."""
        self.dead_codes_replaced = torch.zeros((), dtype=torch.long, device=x.device)
        if not ema_update and self.threshold_ema_dead_code <= 0:
            return
        self.keep_fp32_buffers_()
        self._check_in_place_write("threshold_ema_dead_code" if not ema_update else "the EMA update")
        x = self.to_codebook_frame(x)
        counts, sums = code_statistics(x, indices, self.codebook_size, keep, sync, group)
        if accumulate:
            self._accumulate_(counts, sums)
            return
        pending = self.accum_cluster_size is not None
        if pending:
            counts, sums = counts + self.accum_cluster_size, sums + self.accum_embed_sum
        weight = ema_weight(weight, sums, counts) if callable(weight) else weight
        ema_update_(self.cluster_size, self.embed_avg, counts, sums, self.decay, weight)
        if pending:
            self._free_accumulators()
        if ema_update and not self.manual_ema_update:
            self._set_from_statistics()
        if self.threshold_ema_dead_code > 0:
            self._revive_dead_codes(x, keep, sync, group)

    @runs_eagerly("accum_ema_update: the accumulators are allocated on first use, a graph break")
    def _accumulate_(self, counts: Tensor, sums: Tensor) -> None:
        if self.accum_cluster_size is None:
            if not bool(counts.any()):  # nothing (empty or all-masked, on every rank): no pending state
                return
            self.register_fp32_buffer(ACCUMULATORS[0], torch.zeros_like(counts))
            self.register_fp32_buffer(ACCUMULATORS[1], torch.zeros_like(sums))
        self.accum_cluster_size.add_(counts)
        self.accum_embed_sum.add_(sums)

    @runs_eagerly("accum_ema_update: the accumulators are freed once applied, a graph break")
    def _free_accumulators(self) -> None:
        for name in ACCUMULATORS:
            setattr(self, name, None)

    @fp32_island
    @torch.no_grad()
    def expire_codes_(self, x: Tensor, keep: Tensor | None = None, sync: bool = False, group=None) -> None:
        """Codes whose EMA count is below threshold_ema_dead_code take vectors of x (h, n, d), as
        searched (the union of the ranks' under sync); nothing without a threshold."""
        self.dead_codes_replaced = torch.zeros((), dtype=torch.long, device=x.device)
        if self.threshold_ema_dead_code <= 0:
            return
        self.keep_fp32_buffers_()
        self._check_in_place_write("expire_codes_")
        self._revive_dead_codes(self.to_codebook_frame(x), keep, sync, group)

    def _revive_dead_codes(self, x: Tensor, keep: Tensor | None, sync: bool, group) -> None:
        """dead_codes.py on this codebook's state, x (h, n, d) in the codebook's frame."""
        self.dead_codes_replaced = revive_dead_codes_(
            self.embed, self.embed_avg, self.cluster_size, x, keep, self.threshold_ema_dead_code,
            float(self.reset_cluster_size), self.use_cosine_sim, self.sample_draws.seed, self.sample_draws.step,
            sync, group)


def _frame_buffer(name: str) -> property:
    return property(lambda self: getattr(self.affine, name),
                    doc=f"affine.{name}, under vector-quantize-pytorch's name (only with affine_param)")


for _name in (*MOMENTS, *INIT_FLAGS):  # the peer's attributes on its codebook
    setattr(Codebook, _name, _frame_buffer(_name))
