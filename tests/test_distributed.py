"""The distributed contract (docs/design.md, "Distributed") in real 2-process gloo groups.

Every rank's data is a pure function of (step, rank), so each rank can rebuild the global
batch (the ranks' batches concatenated) and run the reference in its own process. References:

- a single process (`sync_codebook=False`, or a one-rank `process_group`) trained on the
  global batch: EMA statistics, parameters after optimizer steps, LFQ's entropy and gradients
  must match it (to 1e-5; the loss is a mean over equal-sized per-rank batches, so DDP's
  averaged gradients are the single process's);
- exact cross-rank equality (the bytes of every parameter and buffer all-gathered), where no
  single-process reference exists (k-means init, dead-code replacement, different seeds);
- an fp64 brute-force nearest code on the quantizer's captured input (FSDP2 mixed precision);
- a recorder of every `torch.distributed` collective call: the same sequence on every rank
  whatever the data (empty, masked, uneven), and none at all outside training steps.

Each test spawns one 2-process group (spawning costs seconds, so a worker batches many checks)
and has a timeout: a rank stuck in a collective fails the test instead of hanging.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import vq_layers.distributed
from dist_utils import run_in_processes
from vq_layers import (
    FSQ,
    LFQ,
    GroupedResidualVQ,
    ResidualFSQ,
    ResidualLFQ,
    ResidualVQ,
    VectorQuantize,
)

WORLD = 2
DIM, LATENT = 4, 6  # autoencoder input and latent (quantizer) widths
LR = 0.5


# ------------------------------------------------------------------------------------------
# helpers (run inside the workers)


def _batch(step: int, rank: int, b: int = 2, n: int = 6, dim: int = DIM) -> torch.Tensor:
    """Rank `rank`'s batch at `step`: the same on every rank that asks (no communication)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(b, n, dim, generator=g) * (1 + rank)  # ranks see different distributions


def _alone_group(rank: int):
    """A one-rank group holding this rank: a layer on it is the single-process computation.
    Every rank must create every group, in the same order."""
    return [dist.new_group([r]) for r in range(WORLD)][rank]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, detached copies (FSDP2's sharded ones all-gathered)."""
    state = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.full_tensor() if isinstance(t, DTensor) else t
        state[name] = t.detach().clone()
    return state


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # a byte view compares bitwise (NaN == NaN, -0.0 != 0.0) and passes bools through gloo
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical_across_ranks(state: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of `state` bitwise equal on all ranks (one all-gather; all ranks must call,
    and all reach the same verdict)."""
    names = sorted(state)
    parts = [_bytes(state[name]) for name in names]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    differ, start = [], 0
    for name, part in zip(names, parts):
        stop = start + part.numel()
        if not all(torch.equal(copies[0][start:stop], c[start:stop]) for c in copies[1:]):
            differ.append(name)
        start = stop
    assert not differ, f"{what}: {differ} differ across ranks"


def _assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{what}: non-finite {bad}"


def _assert_close_state(state, reference, what: str, tol: float = 1e-5) -> None:
    assert state.keys() == reference.keys(), what
    for name, t in state.items():
        if t.is_floating_point():
            torch.testing.assert_close(t, reference[name], rtol=tol, atol=tol,
                                       msg=lambda m, name=name: f"{what}: {name}: {m}")
        else:
            assert torch.equal(t, reference[name]), f"{what}: {name}"


def _assert_unchanged(before, after, what: str) -> None:
    changed = [name for name in before if not torch.equal(_bytes(before[name]), _bytes(after[name]))]
    assert not changed, f"{what}: {changed} changed"


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "gather", "scatter", "all_gather_object", "broadcast_object_list", "barrier")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_describe(v) for v in value)
    return None


class _CollectiveLog(list):
    """(name, shapes and dtypes of the tensor arguments) per collective call, plus markers.

    With a `lockstep` group, every entry is first compared with the other ranks' (over that
    group, by the unpatched all_gather_object): the first difference raises AssertionError on
    every rank, naming it, where the mismatched collective itself would abort or hang. With
    `forbidden`, a collective call raises AssertionError instead of running.
    """

    def __init__(self, all_gather_object, lockstep=None, forbidden=False):
        super().__init__()
        self._all_gather_object, self._lockstep, self._forbidden = all_gather_object, lockstep, forbidden

    def last_marker(self):
        return next((e for e in reversed(self) if e[0] == "marker"), None)

    def add(self, entry) -> None:
        if self._forbidden and entry[0] != "marker":
            raise AssertionError(f"collective {entry} during {self.last_marker()}")
        if self._lockstep is not None:
            entries = [None] * dist.get_world_size(self._lockstep)
            self._all_gather_object(entries, entry, group=self._lockstep)
            if any(e != entries[0] for e in entries):
                raise AssertionError(f"collectives differ across ranks after {self.last_marker()} and "
                                     f"{len(self)} entries: the ranks call {entries}")
        self.append(entry)

    def mark(self, *what) -> None:
        self.add(("marker", what))


@contextlib.contextmanager
def _record_collectives(lockstep=None, forbidden=False):
    """Logs every collective called through the `torch.distributed` module (as the library calls
    them: `dist.all_reduce(...)`) into a `_CollectiveLog`, then runs it."""
    assert vq_layers.distributed.dist is dist  # the attributes patched here are the library's
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    log = _CollectiveLog(originals["all_gather_object"], lockstep, forbidden)

    def recorder(name, original):
        def call(*args, **kwargs):
            described = (_describe(a) for a in (*args, *kwargs.values()))
            log.add((name, tuple(d for d in described if d is not None)))
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, recorder(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class _AutoEncoder(nn.Module):
    """Linear encoder -> VectorQuantize -> Linear decoder."""

    def __init__(self, **vq_kwargs):
        super().__init__()
        self.encoder = nn.Linear(DIM, LATENT)
        self.vq = VectorQuantize(LATENT, **vq_kwargs)
        self.decoder = nn.Linear(LATENT, DIM)

    def forward(self, x):
        quantized, indices, loss = self.vq(self.encoder(x))
        return self.decoder(quantized), indices, loss


def _train_step(model, optimizer, x):
    """One step on the mean loss over x's tokens; returns the chosen indices."""
    out, indices, vq_loss = model(x)
    loss = F.mse_loss(out.float(), x) + vq_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return indices


def _fully_shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for module in (model.encoder, model.decoder, model):
        fully_shard(module, **kwargs)
    return model


def _quiet_fsdp():
    # FSDP2 warns that a wrapped Linear returned a view (a harmless (b, n, d) reshape)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


# ------------------------------------------------------------------------------------------
# 1, 2. DDP and FSDP2 training: identical across ranks, equal to one process on the global batch

STEPS = 4
# (VectorQuantize keywords, compare with one process on the global batch, DDP broadcast_buffers)
TRAIN_CONFIGS = [
    ({"codebook_size": 8}, True, True),
    # inner width 2 * 2 != LATENT: the quantizer's own projections train too
    ({"codebook_size": 8, "heads": 2, "separate_codebook_per_head": True, "codebook_dim": 2}, True, False),
    # k-means and dead codes sample data: no single-process reference, ranks must agree exactly
    ({"codebook_size": 16, "kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": 2.0, "heads": 2,
      "separate_codebook_per_head": True, "codebook_dim": 3}, False, False),
]


def _train_and_compare(rank: int, world: int, wrapper: str) -> None:
    for vq_kwargs, compare, broadcast_buffers in TRAIN_CONFIGS:
        what = f"{wrapper} {vq_kwargs}"
        torch.manual_seed(0)
        model = _AutoEncoder(**vq_kwargs)
        torch.manual_seed(0)
        single = _AutoEncoder(sync_codebook=False, **vq_kwargs)
        initial = _state(model)
        _assert_close_state(initial, _state(single), what, tol=0)
        if wrapper == "ddp":
            # broadcast_buffers=False: only the library keeps the codebooks alike
            wrapped = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        else:
            wrapped = _fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # after wrapping: FSDP2 swaps params
        single_optimizer = torch.optim.SGD(single.parameters(), lr=LR)
        torch.manual_seed(100 + rank)  # from here on, a local random draw differs between ranks
        replaced = 0
        for step in range(STEPS):
            batches = [_batch(step, r) for r in range(world)]
            indices = _train_step(wrapped, optimizer, batches[rank])
            replaced += int(model.vq._codebook.dead_codes_replaced)
            if compare:
                single_indices = _train_step(single, single_optimizer, torch.cat(batches))
                assert torch.equal(indices, single_indices.chunk(world)[rank]), f"{what}: step {step} indices"
        state = _state(model)
        _assert_identical_across_ranks(state, what)
        _assert_finite(state, what)
        for name in ("encoder.weight", "vq._codebook.embed", "vq._codebook.embed_avg"):
            assert not torch.equal(state[name], initial[name]), f"{what}: {name} did not train"
        if compare:
            _assert_close_state(state, _state(single), what)
        if vq_kwargs.get("threshold_ema_dead_code"):
            assert replaced > 0, f"{what}: the dead-code path never ran"


def _ddp_worker(rank: int, world: int) -> None:
    _train_and_compare(rank, world, "ddp")
    _gan_loop(rank, world)


def _gan_loop(rank: int, world: int) -> None:
    """7. Generator steps (quantizer trains, its loss used), discriminator steps (quantizer under
    no_grad), steps whose quantizer loss is computed but unused, steps without the quantizer."""
    torch.manual_seed(0)
    gen = _AutoEncoder(codebook_size=8, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0,
                       codebook_diversity_loss_weight=0.1)
    disc = nn.Linear(DIM, 1)
    g = DistributedDataParallel(gen, broadcast_buffers=False)
    d = DistributedDataParallel(disc)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    schedule = ["gen", "disc", "gen_vq_loss_unused", "disc_only", "gen", "disc", "gen_vq_loss_unused"]
    for step, kind in enumerate(schedule):
        real = _batch(step, rank)
        if kind.startswith("gen"):
            fake, _, vq_loss = g(real)
            loss = F.mse_loss(fake, real) - d(fake).mean()
            if kind == "gen":
                loss = loss + vq_loss
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
            continue
        if kind == "disc":
            before = _state(gen)
            with torch.no_grad():
                fake, _, _ = g(real)
            _assert_unchanged(before, _state(gen), "no_grad generator forward")
            scores = d(torch.cat([fake, real]))  # one DDP forward per backward
            loss = scores[: len(fake)].mean() - scores[len(fake):].mean()
        else:
            loss = -d(real).mean()
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    state = {**{f"gen.{k}": v for k, v in _state(gen).items()}, **{f"disc.{k}": v for k, v in _state(disc).items()}}
    _assert_identical_across_ranks(state, "GAN loop")
    _assert_finite(state, "GAN loop")
    assert bool(gen.vq._codebook.initted)


@pytest.mark.timeout(150)
def test_ddp_training_equals_single_process_and_gan_loop():
    run_in_processes(_ddp_worker, WORLD, timeout=120)


def _fsdp_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    _quiet_fsdp()
    _train_and_compare(rank, world, "fsdp2")

    # bf16 params: the quantizer sees bf16 input; its statistics stay fp32 and its indices are
    # the exact nearest codes of that input
    torch.manual_seed(0)
    model = _fully_shard(_AutoEncoder(codebook_size=8), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    seen = []

    def capture(module, args):
        seen.append((args[0].detach().clone(), module._codebook.embed.detach().clone()))

    model.vq.register_forward_pre_hook(capture)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    initial = _state(model.vq)
    for step in range(STEPS):
        indices = _train_step(model, optimizer, _batch(step, rank))
        x, codebook = seen[-1]
        assert x.dtype == torch.bfloat16, "mixed precision did not reach the quantizer"
        d2 = torch.cdist(x.double().reshape(-1, LATENT), codebook[0].double()).square()
        best2 = d2.topk(2, largest=False).values
        clear = (best2[:, 1] - best2[:, 0]) > 1e-4 * (1 + best2[:, 1])  # leave out near-ties
        assert clear.float().mean() > 0.5
        assert torch.equal(indices.reshape(-1)[clear], d2.argmin(-1)[clear]), f"step {step}"
    state = _state(model.vq)
    for name in ("_codebook.embed", "_codebook.embed_avg", "_codebook.cluster_size"):
        assert state[name].dtype == torch.float32, name
        assert model.vq.get_buffer(name).dtype == torch.float32, name
    assert not torch.equal(state["_codebook.embed"], initial["_codebook.embed"])
    _assert_identical_across_ranks(state, "FSDP2 bf16")
    _assert_finite(state, "FSDP2 bf16")

    # a learnable codebook (a sharded parameter) without in-place writes trains as one process
    kwargs = {"codebook_size": 8, "learnable_codebook": True, "ema_update": False}
    torch.manual_seed(0)
    model = _fully_shard(_AutoEncoder(**kwargs))
    torch.manual_seed(0)
    single = _AutoEncoder(sync_codebook=False, **kwargs)
    initial = single.vq._codebook.embed.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    single_optimizer = torch.optim.SGD(single.parameters(), lr=LR)
    for step in range(STEPS):
        batches = [_batch(step, r) for r in range(world)]
        _train_step(model, optimizer, batches[rank])
        _train_step(single, single_optimizer, torch.cat(batches))
    embed = model.vq._codebook.embed
    assert isinstance(embed, DTensor)  # the case under test: FSDP2 holds the codebook sharded
    torch.testing.assert_close(embed.full_tensor(), single.vq._codebook.embed.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(single.vq._codebook.embed.detach(), initial), "the codebook did not train"
    state = _state(model)
    _assert_identical_across_ranks(state, "FSDP2 learnable")
    _assert_close_state(state, _state(single), "FSDP2 learnable")

    # 10. FSDP2 rebuilds a sharded parameter from its shards at every all-gather: an in-place write
    # (k-means init, dead-code replacement) to a learnable codebook would be silently lost
    for extra in ({"threshold_ema_dead_code": 1.0}, {"kmeans_init": True}):
        torch.manual_seed(0)
        model = _fully_shard(_AutoEncoder(codebook_size=8, learnable_codebook=True, ema_update=False, **extra))
        with pytest.raises(ValueError, match="learnable_codebook"):
            model(_batch(0, rank))
        dist.barrier()  # both ranks raised and are still in step

    # Codebook has no forward for FSDP2 to hook: sharded on its own, its codes would stay sharded
    # in the layer's forward, and full_tensor's backward would skip the reduce-scatter
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _AutoEncoder(codebook_size=8, learnable_codebook=True, ema_update=False)
    fully_shard(model.vq._codebook)
    model = _fully_shard(model)
    with pytest.raises(ValueError, match="still sharded"):
        model(_batch(0, rank))
    dist.barrier()


@pytest.mark.timeout(150)
def test_fsdp2_training_mixed_precision_and_learnable_codebook():
    run_in_processes(_fsdp_worker, WORLD, timeout=120)


# ------------------------------------------------------------------------------------------
# 3. LFQ under DDP: the entropy of the global batch, gradients by the DDP convention


class _LinearLFQ(nn.Module):
    def __init__(self, group=None):
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                       process_group=group)

    def forward(self, x):
        return self.lfq(self.linear(x), inv_temperature=1.0, return_loss_breakdown=True)


def _lfq_loss(ret, target):
    # mean over this process's tokens: equal-sized rank batches make DDP's average the global mean
    return F.mse_loss(ret.quantized, target) + ret.entropy_aux_loss


def _lfq_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    mine = slice(rank * 2, rank * 2 + 2)
    zs = [_batch(0, r, dim=4) * 0.5 for r in range(world)]
    targets = [_batch(1, r, dim=4) for r in range(world)]

    # the layer alone: entropies of the global batch; input gradient = world x the single slice
    lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25).train()
    single_lfq = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                     process_group=alone).train()
    z = zs[rank].clone().requires_grad_()
    z_all = torch.cat(zs).requires_grad_()
    ret, breakdown = lfq(z, inv_temperature=1.0, return_loss_breakdown=True)
    single_ret, single_breakdown = single_lfq(z_all, inv_temperature=1.0, return_loss_breakdown=True)
    for field in ("per_sample_entropy", "batch_entropy"):
        value, expected = getattr(breakdown, field), getattr(single_breakdown, field)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=lambda m, field=field: f"{field}: {m}")
    assert single_breakdown.batch_entropy > 0.1  # far from a degenerate batch
    _assert_identical_across_ranks({"per_sample": breakdown.per_sample_entropy,
                                    "batch": breakdown.batch_entropy}, "LFQ entropies")
    _lfq_loss(ret, targets[rank]).backward()
    _lfq_loss(single_ret, torch.cat(targets)).backward()
    assert z_all.grad[mine].abs().max() > 0
    torch.testing.assert_close(z.grad, world * z_all.grad[mine], rtol=1e-5, atol=1e-6)
    # the entropy term alone, whose gradient crosses ranks
    z.grad = z_all.grad = None
    lfq.commitment_loss_weight = single_lfq.commitment_loss_weight = 0.0
    lfq(z, inv_temperature=1.0)[2].backward()
    single_lfq(z_all, inv_temperature=1.0)[2].backward()
    torch.testing.assert_close(z.grad, world * z_all.grad[mine], rtol=1e-5, atol=1e-7)

    # under DDP, a Linear before LFQ: its averaged gradient is the single process's
    torch.manual_seed(0)
    model = _LinearLFQ()
    torch.manual_seed(0)
    single = _LinearLFQ(alone)
    ddp = DistributedDataParallel(model)
    xs = [_batch(2, r, dim=5) for r in range(world)]
    ret, breakdown = ddp(xs[rank])
    single_ret, single_breakdown = single(torch.cat(xs))
    torch.testing.assert_close(breakdown.batch_entropy, single_breakdown.batch_entropy, rtol=1e-5, atol=1e-6)
    _lfq_loss(ret, targets[rank]).backward()
    _lfq_loss(single_ret, torch.cat(targets)).backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert q.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(90)
def test_lfq_under_ddp_entropy_and_gradients_equal_single_process():
    run_in_processes(_lfq_worker, WORLD, timeout=60)


# ------------------------------------------------------------------------------------------
# 4. uneven, empty and all-masked per-rank batches

# per step, per rank: (b, n, mask) with mask None | "some" | "none" (every token masked)
RAGGED_STEPS = [
    ((0, 4, None), (0, 3, None)),  # no tokens on any rank
    ((0, 4, None), (2, 3, None)),  # rank 0 empty (b = 0)
    ((1, 5, None), (1, 9, None)),  # 5 and 9 tokens
    ((2, 4, "none"), (2, 4, "some")),  # rank 0 all masked
    ((2, 0, None), (3, 2, "some")),  # rank 0 empty (n = 0)
    ((2, 3, "some"), (1, 4, None)),
    ((1, 6, "some"), (2, 4, "none")),  # rank 1 all masked
]


def _ragged(step: int, rank: int, dim: int = 4):
    """(x, mask or None, x's kept tokens (m, dim)) of `rank` at `step` of RAGGED_STEPS."""
    b, n, kind = RAGGED_STEPS[step][rank]
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    x = torch.randn(b, n, dim, generator=g) * (1 + rank)
    if kind is None:
        return x, None, x.reshape(-1, dim)
    mask = torch.rand(b, n, generator=g) > 0.4 if kind == "some" else torch.zeros(b, n, dtype=torch.bool)
    if kind == "some":
        mask[0, 0] = True
    return x, mask, x[mask]


def _quantizers_for_ragged():
    """(name, make(**extra), single-process extra keywords or None: no single reference)."""
    return [
        ("vq ema", lambda **kw: VectorQuantize(4, 8, **kw), {"sync_codebook": False}),
        ("vq kmeans dead codes", lambda **kw: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2,
                                                            threshold_ema_dead_code=1.0, **kw), None),
        ("rvq ema", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **kw),
         {"sync_codebook": False}),
        ("rvq kmeans dead codes", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, kmeans_init=True,
                                                         kmeans_iters=2, threshold_ema_dead_code=1.0, **kw), None),
        ("lfq", lambda **kw: LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, **kw), "alone"),
    ]


def _ragged_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    for name, make, single_kwargs in _quantizers_for_ragged():
        torch.manual_seed(0)
        layer = make().train()
        single = None
        if single_kwargs is not None:
            torch.manual_seed(0)
            single = make(**({"process_group": alone} if single_kwargs == "alone" else single_kwargs)).train()
        initial = _state(layer)
        torch.manual_seed(100 + rank)
        for step in range(len(RAGGED_STEPS)):
            what = f"{name}, step {step}"
            x, mask, _ = _ragged(step, rank)
            x.requires_grad_()
            kept = torch.cat([_ragged(step, r)[2] for r in range(world)])[None]  # (1, N, dim)
            if isinstance(layer, LFQ):
                (out, _, loss), breakdown = layer(x, mask=mask, inv_temperature=1.0, return_loss_breakdown=True)
                _, single_breakdown = single(kept, inv_temperature=1.0, return_loss_breakdown=True)
                torch.testing.assert_close(torch.stack(breakdown[:2]), torch.stack(single_breakdown[:2]),
                                           rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
            else:
                out, _, loss = layer(x, mask=mask)
                if single is not None:
                    single(kept)
            assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(loss).all(), what
            (out.square().sum() + loss.sum()).backward()
            assert torch.isfinite(x.grad).all(), what
            state = _state(layer)
            _assert_identical_across_ranks(state, what)
            _assert_finite(state, what)
            if single is not None and not isinstance(layer, LFQ):
                _assert_close_state(state, _state(single), what)
        if not isinstance(layer, LFQ):
            assert any(not torch.equal(state[k], initial[k]) for k in state), f"{name}: nothing trained"


@pytest.mark.timeout(120)
def test_uneven_empty_and_masked_batches():
    run_in_processes(_ragged_worker, WORLD, timeout=90)


# per step, per rank: (b, n, which samples are kept) for a (b,) per-sample mask
SAMPLE_MASK_STEPS = [
    ((3, 4, [True, False, True]), (2, 5, [False, True])),
    ((2, 4, [False, False]), (2, 3, [True, True])),  # rank 0 drops every sample
    ((2, 4, [False, False]), (1, 3, [False])),  # nothing kept anywhere
]


def _sample_mask_batch(step: int, rank: int, dim: int = 4):
    """(x, sample mask (b,), x's kept tokens (m, dim)) of `rank` at `step` of SAMPLE_MASK_STEPS."""
    b, n, samples = SAMPLE_MASK_STEPS[step][rank]
    x = torch.randn(b, n, dim, generator=torch.Generator().manual_seed(700 + 10 * step + rank)) * (1 + rank)
    kept = [i for i, keep in enumerate(samples) if keep]
    return x, torch.tensor(samples), x[kept].reshape(-1, dim)


def _lfq_sample_mask_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    torch.manual_seed(0)
    layer = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1).train()
    torch.manual_seed(0)
    single = LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, process_group=alone).train()
    for step in range(len(SAMPLE_MASK_STEPS)):
        what = f"step {step}"
        x, samples, _ = _sample_mask_batch(step, rank)
        x.requires_grad_()
        kept = torch.cat([_sample_mask_batch(step, r)[2] for r in range(world)])[None]  # (1, N, dim)
        (out, indices, loss), breakdown = layer(x, mask=samples, inv_temperature=1.0, return_loss_breakdown=True)
        _, single_breakdown = single(kept, inv_temperature=1.0, return_loss_breakdown=True)
        # the entropies of the global batch's kept tokens: dropped samples are not in the count
        torch.testing.assert_close(torch.stack(breakdown[:2]), torch.stack(single_breakdown[:2]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        assert (indices[~samples] == -1).all() and (out[~samples] == 0).all(), what
        (out.square().sum() + loss).backward()
        assert torch.isfinite(x.grad).all() and (x.grad[~samples] == 0).all(), what


@pytest.mark.timeout(120)
def test_lfq_sample_mask_counts_the_global_kept_tokens():
    run_in_processes(_lfq_sample_mask_worker, WORLD, timeout=90)


# ------------------------------------------------------------------------------------------
# 5. the same collectives on every rank, whatever the data


def _quantizers_for_collectives():
    """(name, make())."""
    return [
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, quantize_dropout=True, kmeans_init=True,
                                   kmeans_iters=2, threshold_ema_dead_code=1.5)),
        ("lfq", lambda: LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1, commitment_loss_weight=0.1)),
        ("residual lfq", lambda: ResidualLFQ(dim=4, num_quantizers=2, codebook_size=16, quantize_dropout=True)),
        ("vq", lambda: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.5,
                                      codebook_diversity_loss_weight=0.1)),
    ]


def _same_collectives_worker(rank: int, world: int) -> None:
    lockstep = dist.new_group(backend="gloo")  # a side channel to compare the calls as they come
    for name, make in _quantizers_for_collectives():
        torch.manual_seed(0)
        layer = make().train()
        torch.manual_seed(100 + rank)  # local random draws differ between ranks
        with _record_collectives(lockstep) as log:
            for step in range(len(RAGGED_STEPS)):
                log.mark(name, "step", step, RAGGED_STEPS[step])
                x, mask, _ = _ragged(step, rank)
                out, _, loss = layer(x.requires_grad_(), mask=mask)
                log.mark(name, "backward of step", step, RAGGED_STEPS[step])
                (out.square().sum() + loss.sum()).backward()
        calls = [entry for entry in log if entry[0] != "marker"]
        assert calls, f"{name}: the recorder saw no collective in training"
        logs = [None] * world
        dist.all_gather_object(logs, calls)
        assert logs[0] == logs[1], f"{name}: the ranks' collectives differ"


@pytest.mark.timeout(120)
def test_same_collectives_whatever_the_data():
    run_in_processes(_same_collectives_worker, WORLD, timeout=90)


# ------------------------------------------------------------------------------------------
# 6. no collective outside training steps (rank 0 alone: any collective fails or hangs)


def _quantizers_without_collectives():
    """(name, layer, forward keywords, decode(layer, indices) -> tensors)."""
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return [
        ("vq", VectorQuantize(4, 8, kmeans_init=True, threshold_ema_dead_code=1.0, codebook_diversity_loss_weight=0.1),
         {"mask": mask}, lambda m, i: [m.get_output_from_indices(i), m.get_codes_from_indices(i)]),
        ("vq heads", VectorQuantize(4, 8, heads=2, separate_codebook_per_head=True, codebook_dim=2,
                                    threshold_ema_dead_code=1.0, orthogonal_reg_weight=0.1),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("rvq", ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, quantize_dropout=True, kmeans_init=True,
                           threshold_ema_dead_code=1.0), {"mask": mask},
         lambda m, i: [m.get_output_from_indices(i), m.get_codes_from_indices(i)]),
        ("grouped rvq", GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=8, quantize_dropout=True,
                                          threshold_ema_dead_code=1.0),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("lfq", LFQ(dim=4, codebook_size=16, entropy_loss_weight=0.1), {"mask": mask},
         lambda m, i: [m.indices_to_codes(i)]),
        ("residual lfq", ResidualLFQ(dim=4, num_quantizers=2, codebook_size=16, quantize_dropout=True),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
        ("fsq", FSQ(levels=[3, 5], dim=4), {}, lambda m, i: [m.indices_to_codes(i)]),
        ("residual fsq", ResidualFSQ(dim=4, levels=[3, 5], num_quantizers=2, quantize_dropout=True),
         {}, lambda m, i: [m.get_output_from_indices(i)]),
    ]


def _no_collectives_worker(rank: int, world: int) -> None:
    if rank != 0:
        return  # rank 0 is alone in the group from here on: a collective would fail or hang
    alone = dist.new_group([0], use_local_synchronization=True)
    with _record_collectives() as log:  # the recorder sees a collective (on a one-rank group)
        dist.all_reduce(torch.zeros(1), group=alone)
    assert log == [("all_reduce", (((1,), "torch.float32"),))]
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    for name, layer, kwargs, decode in _quantizers_without_collectives():
        before = _state(layer)
        with _record_collectives(forbidden=True) as log:
            log.mark(name, "eval forward")
            layer.eval()
            indices = layer(x.clone().requires_grad_(), **kwargs)[1]
            layer.train()
            log.mark(name, "training forward under no_grad")
            with torch.no_grad():
                layer(x, **kwargs)
            log.mark(name, "training forward under inference_mode")
            with torch.inference_mode():
                layer(x, **kwargs)
            log.mark(name, "decoding indices")
            with torch.no_grad():
                decode(layer, indices)
            decode(layer, indices)
        assert all(entry[0] == "marker" for entry in log), name
        _assert_unchanged(before, _state(layer), name)


@pytest.mark.timeout(60)
def test_no_collectives_in_eval_no_grad_inference_or_decoding():
    run_in_processes(_no_collectives_worker, WORLD, timeout=45)


# ------------------------------------------------------------------------------------------
# 8. a NaN on one rank raises on every rank


def _nan_worker(rank: int, world: int) -> None:
    layers = [
        ("vq", lambda: VectorQuantize(4, 8), True),
        ("vq kmeans dead codes", lambda: VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=2,
                                                       threshold_ema_dead_code=1.0), False),
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8), True),
    ]
    for name, make, warm_up in layers:
        torch.manual_seed(0)
        layer = make().train()
        if warm_up:  # a normal step first (the state broadcast and the EMA have run)
            layer(_batch(0, rank, dim=4))
        before = _state(layer)
        x = _batch(1, rank, dim=4)
        if rank == 0:
            x[1, 2, 3] = math.nan
        with pytest.raises(ValueError):
            layer(x)
        _assert_unchanged(before, _state(layer), f"{name} after the NaN step")
        # padding may hold NaN: it never enters
        layer(x, mask=~torch.isnan(x).any(-1))
        layer(_batch(2, rank, dim=4))
        state = _state(layer)
        _assert_identical_across_ranks(state, name)
        _assert_finite(state, name)
        assert any(not torch.equal(state[k], before[k]) for k in state), f"{name}: the normal steps changed nothing"


@pytest.mark.timeout(90)
def test_nan_on_one_rank_raises_on_every_rank():
    run_in_processes(_nan_worker, WORLD, timeout=60)


# ------------------------------------------------------------------------------------------
# 9, 11. no DDP wrapper: the first synced step makes the ranks' state one; sync_codebook=False
# keeps per-rank codebooks


def _plain_group_worker(rank: int, world: int) -> None:
    alone = _alone_group(rank)
    for name, make in [("vq", lambda **kw: VectorQuantize(4, 8, **kw)),
                       ("rvq", lambda **kw: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, **kw))]:
        torch.manual_seed(rank)  # different initial codebooks on purpose
        layer = make().train()
        gathered = [torch.empty_like(layer.codebooks if name == "rvq" else layer.codebook) for _ in range(world)]
        dist.all_gather(gathered, (layer.codebooks if name == "rvq" else layer.codebook).contiguous())
        assert not torch.equal(gathered[0], gathered[1])  # the premise
        torch.manual_seed(0)  # rank 0's initial state, here on every rank
        single = make(process_group=alone).train()
        batches = [_batch(0, r, dim=4) for r in range(world)]
        layer(batches[rank])
        single(torch.cat(batches))
        state = _state(layer)
        _assert_identical_across_ranks(state, f"{name}: after the first step")
        _assert_close_state(state, _state(single), f"{name}: first step from rank 0's state")

    # sync_kmeans=False: k-means on each rank's own data, which differ a lot here (rank 0's has
    # empty clusters, rank 1's none); the codebooks must still agree, or the ranks would disagree
    # on which codes are dead and issue different collectives (a hang)
    torch.manual_seed(0)
    layer = VectorQuantize(4, 16, kmeans_init=True, kmeans_iters=2, sync_kmeans=False,
                           threshold_ema_dead_code=0.5, decay=0.99).train()
    replaced = 0
    for step in range(4):
        if rank == 0:
            x = torch.cat([torch.ones(36, 4), torch.randn(4, 4, generator=torch.Generator().manual_seed(step))])
        else:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7)) * 50
        layer(x[None].requires_grad_())
        replaced += int(layer._codebook.dead_codes_replaced)
        _assert_identical_across_ranks(_state(layer), f"sync_kmeans=False, step {step}")
    assert replaced > 0, "the dead-code path never ran"

    # sync_codebook=False: each rank trains alone, as a process without a group would
    for kwargs in ({}, {"kmeans_init": True, "kmeans_iters": 2, "threshold_ema_dead_code": 1.0}):
        torch.manual_seed(0)
        layer = VectorQuantize(4, 8, sync_codebook=False, **kwargs).train()
        torch.manual_seed(0)
        single = VectorQuantize(4, 8, process_group=alone, **kwargs).train()
        with _record_collectives() as log:
            for step in range(2):
                torch.manual_seed(step)
                layer(_batch(step, rank, dim=4))
        for step in range(2):
            torch.manual_seed(step)
            single(_batch(step, rank, dim=4))
        assert not log, f"sync_codebook=False issued collectives: {log}"
        state = _state(layer)
        _assert_close_state(state, _state(single), f"sync_codebook=False {kwargs}", tol=0)
        codebook = state["_codebook.embed"]
        gathered = [torch.empty_like(codebook) for _ in range(world)]
        dist.all_gather(gathered, codebook)
        assert not torch.equal(gathered[0], gathered[1]), f"{kwargs}: per-rank codebooks did not diverge"


@pytest.mark.timeout(90)
def test_first_step_broadcasts_state_and_sync_codebook_false_stays_per_rank():
    run_in_processes(_plain_group_worker, WORLD, timeout=60)


# ------------------------------------------------------------------------------------------
# composite layers: every stage identical from the first synced step, whether or not dropout
# runs it (each used to take the first rank's state only at its own first synced step)


def _draw_seeds(module: nn.Module) -> dict[str, torch.Tensor]:
    """The counter streams' seeds (row draws, dropout depths): not buffers, but state every rank
    must hold alike."""
    return {f"{name}.{attr}.seed": getattr(sub, attr).seed for name, sub in module.named_modules()
            for attr in ("sample_draws", "dropout_draws") if hasattr(sub, attr)}


def _composites():
    from vq_layers import HierarchicalVQ, ResidualSimVQ
    # (name, layer, training kwargs): a fixed dropout seed that keeps only the first stage, so
    # the stages after it never run in training
    shallow = next(seed for seed in range(100) if __import__("random").Random(seed).randrange(0, 4) == 0)
    return [
        ("rvq", lambda: ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True),
         {"rand_quantize_dropout_fixed_seed": shallow}),
        ("rvq_kmeans", lambda: ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True,
                                          kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0), {}),
        ("grouped_rvq", lambda: GroupedResidualVQ(dim=4, groups=2, num_quantizers=4, codebook_size=8,
                                                  quantize_dropout=True), {}),
        ("hierarchical", lambda: HierarchicalVQ(dim=4, codebook_size=8, scales=[1, 2, 6], shared_codebook=False,
                                                nested_dropout=0.9, kmeans_init=False, channel_first=False), {}),
        ("residual_sim_vq", lambda: ResidualSimVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True),
         {"rand_quantize_dropout_fixed_seed": shallow}),
        ("residual_lfq", lambda: ResidualLFQ(dim=4, codebook_size=16, num_quantizers=4, quantize_dropout=True), {}),
    ]


def _first_synced_step_worker(rank: int, world: int) -> None:
    for name, make, kwargs in _composites():
        torch.manual_seed(rank)  # each rank builds its own random stages and buffers
        layer = make().train()
        for param in layer.parameters():  # the parameters alike, as DDP would make them (not the buffers)
            dist.broadcast(param.data, 0)
        for step in range(3):
            layer(_batch(step, rank, n=6, dim=4).requires_grad_(True), **kwargs)
        state = {**dict(layer.named_buffers()), **_draw_seeds(layer)}
        _assert_identical_across_ranks(state, f"{name}: after 3 training steps")
        with torch.no_grad():
            _, indices, *_ = layer.eval()(_batch(9, 0, n=6, dim=4))  # the same input on every rank
        indices = torch.cat([i.flatten() for i in indices]) if isinstance(indices, tuple) else indices
        _assert_identical_across_ranks({"indices": indices}, f"{name}: eval indices")


@pytest.mark.timeout(120)
def test_every_stage_identical_from_the_first_synced_step():
    run_in_processes(_first_synced_step_worker, WORLD, timeout=100)


# ------------------------------------------------------------------------------------------
# FSDP1 (CUDA only: "FSDP does not support CPU only execution"), one rank on nccl. Runs on a
# GPU machine; skipped in CI.


def _fsdp1_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    policy = MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = FullyShardedDataParallel(_AutoEncoder(codebook_size=8).to(device), mixed_precision=policy,
                                     device_id=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    # FSDP1 casts buffers by assigning buffer.data at its lazy init: the layer restores float32
    # (and says so) before it reads or writes a statistic
    with pytest.warns(UserWarning, match="restored to float32"):
        _train_step(model, optimizer, _batch(0, rank).to(device))
    codebook = model.module.vq._codebook
    for step in range(1, STEPS):
        before = codebook.embed_avg.clone()
        _train_step(model, optimizer, _batch(step, rank).to(device))
        assert not torch.equal(before, codebook.embed_avg)
    for name in ("embed", "embed_avg", "cluster_size"):
        buf = codebook.get_buffer(name)
        assert buf.dtype == torch.float32 and bool(torch.isfinite(buf).all()), name

    # the in-place rule holds under FSDP1 too
    torch.manual_seed(0)
    model = FullyShardedDataParallel(
        _AutoEncoder(codebook_size=8, learnable_codebook=True, ema_update=False, kmeans_init=True).to(device),
        device_id=device)
    with pytest.raises(ValueError, match="learnable_codebook"):
        model(_batch(0, rank).to(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 runs on CUDA only")
@pytest.mark.timeout(150)
def test_fsdp1_mixed_precision_buffers_stay_fp32():
    run_in_processes(_fsdp1_worker, 1, timeout=120, init=False)
