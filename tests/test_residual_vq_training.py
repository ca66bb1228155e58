"""ResidualVQ training: quantize dropout, each layer's EMA step, dead-code replacement, k-means
init, per-stage losses and two gloo processes, against the fp64 reference (rvq_reference.py;
the scheme is described in test_residual_vq.py). The shared codebook's step is in
test_residual_vq_shared_codebook.py."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_in_processes
from reference import close, randn
from rvq_reference import (
    assert_buffers_equal,
    books64,
    codebook_state,
    ema64,
    nearest64,
    reference_layer,
    seeded_training_steps,
    set_codebooks,
)
from vq_layers import ResidualVQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# quantize dropout


@pytest.mark.parametrize("q,cutoff,multiple_of", [(4, 0, 1), (5, 1, 2), (6, 2, 3), (3, 1, 4), (5, 0, 2)])
def test_quantize_dropout_depths(q, cutoff, multiple_of):
    rvq = ResidualVQ(dim=3, num_quantizers=q, codebook_size=8, quantize_dropout=True,
                     quantize_dropout_cutoff_index=cutoff, quantize_dropout_multiple_of=multiple_of).train()
    x = randn(2, 5, 3, seed=8).requires_grad_(True)
    seen = set()
    for seed in range(30):
        before = copy.deepcopy(rvq)
        out, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        # SoundStream / EnCodec: uniform last stage in [cutoff, q), kept count rounded up to a multiple
        last = random.Random(seed).randrange(cutoff, q)
        if multiple_of != 1:
            last = math.ceil((last + 1) / multiple_of) * multiple_of - 1
        kept = min(last + 1, q)
        seen.add(kept)
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (losses[kept:] == 0).all() and (losses[:kept] > 0).all()
        # the train output is the (pre-step) codes exactly
        assert torch.equal(before.get_output_from_indices(indices), out)
        _, again, _ = copy.deepcopy(before)(x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(again, indices), "a fixed seed must give the same dropout"
    expected = {min(math.ceil((last + 1) / multiple_of) * multiple_of, q) for last in range(cutoff, q)}
    assert seen == expected


def test_quantize_dropout_torch_seed_reproduces_and_dropped_layers_untouched():
    q = 5
    rvq = ResidualVQ(dim=3, num_quantizers=q, codebook_size=8, quantize_dropout=True).train()
    x = randn(2, 6, 3, seed=9).requires_grad_(True)
    depths = set()
    for seed, before, (_, indices, _) in seeded_training_steps(rvq, x, range(12)):
        kept = int((indices[0, 0] >= 0).sum())
        depths.add(kept)
        for k, (layer, old) in enumerate(zip(rvq.layers, before.layers)):
            same = torch.equal(layer._codebook.embed, old._codebook.embed) and torch.equal(
                layer._codebook.cluster_size, old._codebook.cluster_size)
            assert same == (k >= kept), f"layer {k}: kept {kept}, buffers changed: {not same}"
        torch.manual_seed(seed)
        assert torch.equal(copy.deepcopy(before)(x)[1], indices), "torch.manual_seed must reproduce the draw"
    assert len(depths) >= 3, depths


def test_no_quantize_dropout_in_eval_or_without_grad():
    rvq = ResidualVQ(dim=3, num_quantizers=4, codebook_size=8, quantize_dropout=True)
    x = randn(2, 5, 3, seed=10)
    for seed in range(8):
        assert (rvq.eval()(x, rand_quantize_dropout_fixed_seed=seed)[1] >= 0).all()
        rvq.train()
        saved = codebook_state(rvq)
        with torch.no_grad():
            _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        assert (indices >= 0).all()
        assert_buffers_equal(rvq, saved)  # no statistics update without gradients either


# ------------------------------------------------------------------------------------------
# EMA codebooks, dead codes and k-means, per layer


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("dim", [4, 9], ids=["no_proj", "proj"])
def test_each_layer_ema_matches_one_hot_reference(dim, masked):
    q, k, d, decay, eps = 3, 16, 4, 0.7, 1e-5
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=dim, codebook_dim=d, num_quantizers=q, codebook_size=k, decay=decay, eps=eps,
                     commitment_weight=0.5).train()
    set_codebooks(rvq, seed=11)
    saved = copy.deepcopy(rvq)
    x = randn(2, 24, dim, seed=12).requires_grad_(True)
    keep = randn(2, 24, seed=13) > -0.5 if masked else torch.ones(2, 24, dtype=torch.bool)
    _, indices, losses = rvq(x, mask=keep if masked else None)

    ref = reference_layer(saved, x, books=books64(saved))  # every stage searched its pre-step codebook
    assert not ref.near_tie[keep].any(), "choose data without near-ties: the EMA reference depends on every index"
    assert torch.equal(indices[keep], ref.indices[keep])
    assert (indices[~keep] == -1).all()
    for s, (layer, old) in enumerate(zip(rvq.layers, saved.layers)):
        vectors, idx = ref.residuals[s][keep], ref.indices[..., s][keep]  # stage s's residual input
        cs, ea, embed = ema64(old._codebook.cluster_size[0], old._codebook.embed_avg[0], vectors, idx, decay, eps)
        close(layer._codebook.cluster_size[0], cs, rtol=1e-6, atol=1e-6)
        close(layer._codebook.embed_avg[0], ea, rtol=1e-5, atol=1e-6)
        close(layer.codebook, embed, rtol=1e-5, atol=1e-6)
        # the commitment loss: 0.5 * MSE of the stage's residual to its code, over the kept tokens
        mse = (vectors - books64(saved)[s][idx]).square().mean()
        close(losses[s], 0.5 * mse, rtol=1e-5, atol=1e-7)
    assert losses.shape == (q,) and losses.dtype == torch.float32


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer", "shared"])
def test_dead_code_replacement_per_layer(shared):
    q, k, d, decay, threshold = 3, 32, 3, 0.8, 0.9
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, decay=decay, threshold_ema_dead_code=threshold,
                     shared_codebook=shared).train()
    set_codebooks(rvq, seed=19, scale=1.0, ratio=0.3)
    saved = copy.deepcopy(rvq)
    x = randn(1, 10, d, seed=20).requires_grad_(True)  # 10 tokens, 32 codes: many dead codes per stage
    rvq(x)
    ref = reference_layer(saved, x)
    assert not ref.near_tie.any()
    groups = [[0, 1, 2]] if shared else [[0], [1], [2]]
    for stages in groups:
        layer, old = rvq.layers[stages[0]], saved.layers[stages[0]]._codebook
        vectors = torch.cat([ref.residuals[s].reshape(-1, d) for s in stages])  # what this codebook saw
        idx = torch.cat([ref.indices[..., s].reshape(-1) for s in stages])
        cs, ea, embed = ema64(old.cluster_size[0], old.embed_avg[0], vectors, idx, decay, old.eps)
        dead = cs < threshold
        assert dead.any() and (~dead).any()
        new = layer._codebook
        replaced = dead & (new.cluster_size[0] == threshold)  # reset_cluster_size defaults to the threshold
        assert int(replaced.sum()) == min(int(dead.sum()), vectors.shape[0])
        assert int(new.dead_codes_replaced) == int(replaced.sum())
        # live codes: the EMA step; revived codes: a vector of this codebook's own stage(s)
        close(new.cluster_size[0][~dead], cs[~dead], rtol=1e-6, atol=1e-6)
        close(new.embed_avg[0][~dead], ea[~dead], rtol=1e-5, atol=1e-6)
        close(layer.codebook[~dead], embed[~dead], rtol=1e-5, atol=1e-6)
        revived = layer.codebook[replaced].to(F64)
        dist_to_pool = (revived.unsqueeze(1) - vectors).norm(dim=-1)  # (revived, pool)
        nearest = dist_to_pool.argmin(1)
        assert (dist_to_pool.amin(1) < 1e-5).all(), "a revived code is not one of its stage's vectors"
        assert nearest.unique().numel() == nearest.numel(), "the same vector revived two codes"
        close(new.embed_avg[0][replaced], revived * threshold, rtol=1e-6, atol=1e-7)
        # dead but not revived (more dead codes than vectors): the EMA values
        rest = dead & ~replaced
        close(new.cluster_size[0][rest], cs[rest], rtol=1e-6, atol=1e-6)


def test_kmeans_init_runs_for_every_layer_on_the_first_training_step():
    q, k, d = 3, 6, 3
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, kmeans_init=True, kmeans_iters=40, decay=1.0)
    centers = randn(k, d, seed=21, scale=3.0)
    labels = torch.randint(0, k, (2, 40), generator=torch.Generator().manual_seed(22))
    x = centers[labels] + randn(2, 40, d, seed=23, scale=0.5)
    assert not any(bool(layer._codebook.initted) for layer in rvq.layers)
    rvq.eval()(x)  # eval never initializes
    assert not any(bool(layer._codebook.initted) for layer in rvq.layers)
    assert all((layer.codebook == 0).all() for layer in rvq.layers)

    rvq.train()(x.clone().requires_grad_(True))
    assert all(bool(layer._codebook.initted) for layer in rvq.layers)
    # decay=1 leaves the k-means statistics as they were: each layer's codebook is a Lloyd fixed
    # point of its own stage's residual (the residual the initialized earlier stages left)
    residual = x.to(F64).reshape(-1, d)
    for s, layer in enumerate(rvq.layers):
        book = layer.codebook.detach().to(F64)
        assign, tie = nearest64(residual, book)
        assert not tie.any()
        counts = torch.bincount(assign, minlength=k).to(F64)
        assert (counts > 0).all(), f"layer {s}: empty k-means cluster"
        close(layer._codebook.cluster_size[0], counts, rtol=0, atol=0)
        means = (F.one_hot(assign, k).to(F64).t() @ residual) / counts.unsqueeze(-1)
        close(book, means, rtol=1e-4, atol=1e-4)
        residual = residual - book[assign]


def test_losses_are_per_stage_fp32():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, codebook_dim=3, num_quantizers=3, codebook_size=8).train()
    x = randn(2, 6, 8, seed=24).to(torch.bfloat16).requires_grad_(True)
    out, _, losses = rvq(x)
    assert losses.shape == (3,) and losses.dtype == torch.float32 and (losses > 0).all()
    (out.float().sum() + losses.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.dtype == x.dtype
    assert rvq.project_in.weight.grad.abs().sum() > 0
    _, _, eval_losses = rvq.eval()(x.detach())
    assert eval_losses.shape == (3,) and eval_losses.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# distributed: 2 real gloo processes


def _gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _distributed_worker(rank, world_size):
    for shared in (False, True):
        torch.manual_seed(0)  # the same initial weights on every rank (as DDP would broadcast them)
        rvq = ResidualVQ(dim=6, codebook_dim=3, num_quantizers=4, codebook_size=8, quantize_dropout=True,
                         shared_codebook=shared, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0,
                         decay=0.8).train()
        start = {name: buf.clone() for name, buf in rvq.named_buffers()}
        torch.manual_seed(100 + rank)  # from here on a per-rank random draw would differ between ranks
        for step in range(2):
            x = randn(2, 5 + 3 * rank, 6, seed=1000 * step + rank).requires_grad_(True)  # per-rank data, uneven
            out, indices, losses = rvq(x)
            kept = torch.tensor([int((indices[0, 0] >= 0).sum())])
            assert (indices[..., : int(kept)] >= 0).all() and (indices[..., int(kept):] == -1).all()
            depths = _gather(kept)
            assert all(torch.equal(d, depths[0]) for d in depths), f"ranks drew different depths: {depths}"
            (out.sum() + losses.sum()).backward()
        for name, buf in rvq.named_buffers():
            parts = _gather(buf.float() if buf.dtype == torch.bool else buf)
            assert all(torch.equal(p, parts[0]) for p in parts), f"shared={shared}: {name} differs across ranks"
        assert any(not torch.equal(buf, start[name]) for name, buf in rvq.named_buffers()), "nothing was trained"


def test_distributed_same_dropout_depth_and_identical_codebooks():
    run_in_processes(_distributed_worker, 2, timeout=120)
