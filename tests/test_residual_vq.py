"""Tests of ResidualVQ and GroupedResidualVQ against an fp64 re-implementation of the scheme.

The references here are written from the description (SoundStream, arXiv 2107.03312,
Algorithm 1; VQ-VAE's EMA codebook, arXiv 1711.00937), not from the code under test:

- z = project_in(x) (fp64 with the layer's weights), residual_0 = z;
- stage k picks i_k = argmin_c ||residual_k - C_k[c]||^2 by brute force over layer k's codebook
  C_k (fp64), residual_{k+1} = residual_k - C_k[i_k]; output = project_out(sum_k C_k[i_k]);
- one EMA step of a codebook from the vectors x_j that chose codes i_j, in fp64 with one-hot
  matrices: counts = sum_j onehot(i_j), sums = onehot^T x,
  cluster_size <- decay * cluster_size + (1 - decay) * counts (embed_avg likewise with sums),
  embed = embed_avg / ((cluster_size + eps) / (total + K eps) * total);
- teacher forcing: stage k's cross-entropy of softmax(-||residual_k - C_k[c]||) (Euclidean
  distance, not squared) to the given code, residual_k left by the *given* codes of stages < k.

A (token, stage) whose two best squared distances lie within 1e-5 of the distance scale is a
genuine near-tie (fp32 and fp64 may pick differently) and is left out of index checks.
"""

from __future__ import annotations

import copy
import inspect
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_utils import run_in_processes
from dtype_matrix import DTYPES, Parts, dtype_matrix, run_cell
from reference import brute_force_usage, call_structure, close, linear64, randn
from rvq_reference import (
    assert_buffers_equal,
    assert_indices_match,
    assert_stagewise_argmin,
    books64,
    codebook_state,
    ema64,
    nearest64,
    project_in64,
    project_out64,
    reference,
    reference_layer,
    set_codebooks,
    teacher_forced_ce64,
)
from test_compile import assert_compiled_matches_eager
from vq_layers import GroupedResidualVQ, ResidualVQ

F64 = torch.float64
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# the residual property, against the fp64 reference


@settings(max_examples=25, deadline=None)
@given(
    q=st.integers(1, 4),
    codebook_size=st.integers(2, 32),
    codebook_dim=st.integers(1, 6),
    project=st.booleans(),
    dtype=st.sampled_from(["fp32", "bf16"]),
    spread=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**16),
)
def test_eval_indices_and_output_match_fp64_reference(q, codebook_size, codebook_dim, project, dtype, spread, seed):
    dim = codebook_dim + 5 if project else codebook_dim
    torch.manual_seed(seed)
    rvq = ResidualVQ(dim=dim, codebook_dim=codebook_dim, num_quantizers=q, codebook_size=codebook_size).eval()
    set_codebooks(rvq, seed, scale=spread)
    x = randn(2, 20, dim, seed=seed + 100, scale=spread).to(DT[dtype])
    out, indices, losses = rvq(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert indices.shape == (2, 20, q) and indices.dtype == torch.long
    assert losses.shape == (q,) and losses.dtype == torch.float32
    assert ((indices >= 0) & (indices < codebook_size)).all()

    z = project_in64(rvq, x)
    books = books64(rvq)
    # stage by stage on the layer's own choices: every (token, stage) that is not a near-tie
    assert assert_stagewise_argmin(indices, z, books) >= 0.5 * indices.numel()
    # an independent run of the whole scheme
    ref = reference(z, books)
    ok = assert_indices_match(indices, ref)
    # the output is project_out of the sum of the chosen codes
    chosen = sum(books[k][indices[..., k]] for k in range(q))
    tol = dict(rtol=1e-5, atol=1e-5 * spread) if dtype == "fp32" else dict(rtol=1e-2, atol=1e-2 * spread)
    close(out, project_out64(rvq, chosen), **tol)
    close(out[ok], project_out64(rvq, ref.out)[ok], **tol)


def test_more_quantizers_reduce_the_error():
    """Each stage quantizes what the others left: the error to z shrinks with every stage."""
    torch.manual_seed(0)
    rvq = set_codebooks(ResidualVQ(dim=3, num_quantizers=4, codebook_size=64).eval(), seed=1, ratio=0.35)
    x = randn(1, 400, 3, seed=2)
    _, indices, _, all_codes = rvq(x, return_all_codes=True)
    partial = torch.zeros_like(x)
    errors = []
    for k in range(4):
        partial = partial + all_codes[k]
        errors.append(float((x - partial).square().mean()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert_stagewise_argmin(indices, x, books64(rvq))


# ------------------------------------------------------------------------------------------
# indices -> codes and output, exactly


@pytest.mark.parametrize("layout", ["tokens", "image"])
@pytest.mark.parametrize("dim", [4, 12], ids=["no_proj", "proj"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_get_output_from_indices_is_exact(dtype, dim, layout):
    q = 3
    torch.manual_seed(0)
    image = layout == "image"
    rvq = ResidualVQ(dim=dim, codebook_dim=4, num_quantizers=q, codebook_size=16, accept_image_fmap=image).eval()
    set_codebooks(rvq, seed=3)
    tokens = randn(2, 3, 5, dim, seed=4).to(DT[dtype])  # (b, h, w, d)
    x = tokens.permute(0, 3, 1, 2) if image else tokens.reshape(2, 15, dim)
    out, indices, _ = rvq(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert indices.shape == ((2, 3, 5, q) if image else (2, 15, q))

    rec = rvq.get_output_from_indices(indices, dtype=x.dtype)
    assert rec.dtype == x.dtype and rec.shape == x.shape
    assert torch.equal(rec, out), "get_output_from_indices differs from the eval forward"
    assert torch.equal(rvq.get_output_from_indices(indices).to(x.dtype), out)
    assert rvq.get_output_from_indices(indices).dtype == torch.float32
    assert torch.equal(rvq.get_output_from_indices(indices.int(), dtype=x.dtype), out)  # int32 accepted

    ref = reference_layer(rvq, tokens)
    token_indices = indices if image else indices.reshape(2, 3, 5, q)
    ok = assert_indices_match(token_indices, ref)
    token_out = out.permute(0, 2, 3, 1) if image else out.reshape(2, 3, 5, dim)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=1e-2, atol=1e-2)
    close(token_out[ok], ref.projected_out[ok], **tol)


@pytest.mark.parametrize("layout", ["tokens", "image"])
@pytest.mark.parametrize("dim", [4, 12], ids=["no_proj", "proj"])
def test_eval_get_output_from_indices_with_mask(dim, layout):
    """Masked positions: indices -1 in every stage, output zeros — in forward and from indices."""
    q = 3
    torch.manual_seed(0)
    image = layout == "image"
    rvq = ResidualVQ(dim=dim, codebook_dim=4, num_quantizers=q, codebook_size=16, accept_image_fmap=image).eval()
    tokens = randn(2, 3, 5, dim, seed=5)
    mask = randn(2, 3, 5, seed=6) > 0
    x = tokens.permute(0, 3, 1, 2) if image else tokens.reshape(2, 15, dim)
    out, indices, _ = rvq(x, mask=mask if image else mask.reshape(2, 15))
    token_indices = indices if image else indices.reshape(2, 3, 5, q)
    token_out = out.permute(0, 2, 3, 1) if image else out.reshape(2, 3, 5, dim)
    assert (token_indices[~mask] == -1).all() and (token_indices[mask] >= 0).all()
    assert (token_out[~mask] == 0).all()
    assert torch.equal(rvq.get_output_from_indices(indices), out), (
        "get_output_from_indices differs from the eval forward at masked positions")


def test_get_codes_from_indices_shapes_dropped_and_coarse():
    q, k, d = 4, 16, 3
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=10, codebook_dim=d, num_quantizers=q, codebook_size=k).eval()
    indices = torch.randint(0, k, (2, 7, q), generator=torch.Generator().manual_seed(1))
    codes = rvq.get_codes_from_indices(indices)
    assert codes.shape == (q, 2, 7, d) and codes.dtype == torch.float32
    books = books64(rvq)
    for s in range(q):
        close(codes[s], books[s][indices[..., s]], rtol=0, atol=0)

    dropped = indices.clone()
    dropped[0, :3, 2:] = -1
    dropped[1, 4, 1:] = -1
    codes = rvq.get_codes_from_indices(dropped)
    assert (codes[2:, 0, :3] == 0).all() and (codes[1:, 1, 4] == 0).all()
    for s in range(q):
        keep = dropped[..., s] >= 0
        close(codes[s][keep], books[s][dropped[..., s][keep]], rtol=0, atol=0)

    # coarse indices: the missing fine stages count as dropped
    for kept in range(1, q + 1):
        coarse = indices[..., :kept]
        padded = torch.cat([coarse, coarse.new_full((2, 7, q - kept), -1)], dim=-1)
        assert torch.equal(rvq.get_codes_from_indices(coarse), rvq.get_codes_from_indices(padded))
        assert torch.equal(rvq.get_output_from_indices(coarse), rvq.get_output_from_indices(padded))
        expected = sum(books[s][indices[..., s]] for s in range(kept))
        close(rvq.get_output_from_indices(coarse), linear64(rvq.project_out, expected), rtol=1e-6, atol=1e-6)

    # image layout: (b, h, w, q) -> (q, b, h, w, d)
    image = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, accept_image_fmap=True)
    assert image.get_codes_from_indices(indices.reshape(2, 7, 1, q)).shape == (q, 2, 7, 1, d)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dropout"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_return_all_codes_equal_get_codes_from_indices(dtype, train):
    q = 4
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=q, codebook_size=16, quantize_dropout=True).train(train)
    x = randn(2, 9, 12, seed=7).to(DT[dtype]).requires_grad_(train)
    saved = copy.deepcopy(rvq)
    out, indices, _, all_codes = rvq(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1)
    assert all_codes.shape == (q, 2, 9, 4) and all_codes.dtype == x.dtype
    kept = int((indices[0, 0] >= 0).sum())
    if train:
        assert kept < q  # seed 1 drops a stage, so the dropped path is exercised
        assert kept == random.Random(1).randrange(0, q) + 1
    assert (all_codes[kept:] == 0).all()
    # the codes the step looked up: the codebooks as they were before its update
    assert torch.equal(all_codes, saved.get_codes_from_indices(indices).to(x.dtype))
    assert torch.equal(saved.get_output_from_indices(indices, dtype=x.dtype), out)
    ref = reference_layer(saved, x, kept=kept)
    ok = assert_indices_match(indices, ref)
    close(all_codes[:, ok], ref.codes[:, ok], rtol=0 if dtype == "fp32" else 1e-2, atol=0)


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
    for seed in range(12):
        before = copy.deepcopy(rvq)
        torch.manual_seed(seed)
        _, indices, _ = rvq(x)
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
# EMA codebooks, per layer and shared


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


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_shared_codebook_step_searches_pre_step_codebook_and_updates_once(masked):
    q, k, d, decay, eps = 3, 16, 4, 0.8, 1e-5
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, shared_codebook=True, decay=decay, eps=eps).train()
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    set_codebooks(rvq, seed=14, scale=0.8)
    saved = copy.deepcopy(rvq)
    book = saved.layers[0].codebook.detach().to(F64).clone()
    x = randn(2, 20, d, seed=15).requires_grad_(True)
    keep = randn(2, 20, seed=16) > -0.5 if masked else torch.ones(2, 20, dtype=torch.bool)
    out, indices, _ = rvq(x, mask=keep if masked else None)

    ref = reference(x, [book] * q)
    assert not ref.near_tie[keep].any(), "choose data without near-ties: the EMA reference depends on every index"
    assert torch.equal(indices[keep], ref.indices[keep]), "a stage searched a codebook changed within the step"
    # the train step's output is what eval on the pre-step codebook gives
    eval_out, eval_indices, _ = saved.eval()(x, mask=keep if masked else None)
    assert torch.equal(out, eval_out) and torch.equal(indices, eval_indices)

    # one EMA step from all the stages' vectors together (not one decay per stage)
    vectors = torch.cat([ref.residuals[s][keep] for s in range(q)])
    idx = torch.cat([ref.indices[..., s][keep] for s in range(q)])
    old = saved.layers[0]._codebook
    cs, ea, embed = ema64(old.cluster_size[0], old.embed_avg[0], vectors, idx, decay, eps)
    new = rvq.layers[0]._codebook
    close(new.cluster_size[0], cs, rtol=1e-6, atol=1e-6)
    close(new.embed_avg[0], ea, rtol=1e-5, atol=1e-6)
    for layer in rvq.layers:
        close(layer.codebook, embed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["diversity", "cross_entropy_commitment"])
def test_shared_codebook_backward_sees_the_codebook_the_step_searched(loss):
    # the losses whose backward recomputes softmax tiles over the codebook: the shared
    # codebook's update after all stages must not leak into them. Reference: the same step
    # with the codebook frozen (no update at all) gives the same losses and input gradients.
    kwargs = dict(codebook_diversity_loss_weight=1.0, codebook_diversity_temperature=1.0, commitment_weight=0.0) \
        if loss == "diversity" else dict(commitment_use_cross_entropy_loss=True)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, shared_codebook=True, decay=0.0, **kwargs).train()
    frozen = copy.deepcopy(rvq)
    x = randn(1, 32, 4, seed=19) * 3
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    _, _, updated_losses = rvq(x1)
    _, _, frozen_losses = frozen(x2, freeze_codebook=True)
    assert not torch.equal(rvq.codebooks, frozen.codebooks)  # the premise: this step moved the codebook
    updated_losses.sum().backward()
    frozen_losses.sum().backward()
    assert torch.equal(updated_losses, frozen_losses)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)


def test_shared_codebook_eval_equals_train_with_frozen_codebook():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=10, codebook_dim=4, num_quantizers=4, codebook_size=16, shared_codebook=True).train()
    x = randn(2, 12, 10, seed=17)
    rvq(x.requires_grad_(True))  # a training step first: a codebook the EMA has moved
    x = randn(2, 12, 10, seed=18)
    saved = codebook_state(rvq)
    frozen_out, frozen_indices, frozen_losses = rvq(x.clone().requires_grad_(True), freeze_codebook=True)
    assert_buffers_equal(rvq, saved)
    eval_out, eval_indices, _ = rvq.eval()(x)
    assert torch.equal(frozen_indices, eval_indices)
    assert torch.equal(frozen_out, eval_out)
    assert frozen_losses.shape == (4,) and (frozen_losses > 0).all()
    ref = reference_layer(rvq, x)
    assert_indices_match(eval_indices, ref)


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
# masks


@pytest.mark.parametrize("kmeans", [False, True], ids=["random_init", "kmeans_init"])
@pytest.mark.parametrize("dim", [4, 9], ids=["no_proj", "proj"])
def test_mask_equals_running_on_the_kept_part(dim, kmeans):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=dim, codebook_dim=4, num_quantizers=3, codebook_size=8, kmeans_init=kmeans,
                     threshold_ema_dead_code=0.5).train()
    alone = copy.deepcopy(rvq)
    x = randn(3, 10, dim, seed=25)
    mask = randn(3, 10, seed=26) > 0
    torch.manual_seed(1)
    out, indices, losses = rvq(x.clone().requires_grad_(True), mask=mask)
    torch.manual_seed(1)
    sub_out, sub_indices, sub_losses = alone(x[mask][None].clone().requires_grad_(True))
    assert (indices[~mask] == -1).all() and (out[~mask] == 0).all()
    assert torch.equal(indices[mask], sub_indices[0])
    close(out[mask], sub_out[0], rtol=1e-6, atol=1e-6)
    close(losses, sub_losses, rtol=1e-5, atol=1e-7)
    for (name, a), (_, b) in zip(rvq.named_buffers(), alone.named_buffers()):
        close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=f"buffer {name}")


def test_image_mask_padding_value_and_all_masked():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=2, codebook_size=8, accept_image_fmap=True).train()
    x = randn(2, 6, 3, 4, seed=27)
    mask = randn(2, 3, 4, seed=28) > 0
    out, indices, losses = rvq(x.clone().requires_grad_(True), mask=mask)
    assert indices.shape == (2, 3, 4, 2) and (indices[~mask] == -1).all() and (indices[mask] >= 0).all()
    assert (out.permute(0, 2, 3, 1)[~mask] == 0).all()

    # return_zeros_for_masked_padding=False: masked positions give the input back
    keep_input = ResidualVQ(dim=6, codebook_dim=3, num_quantizers=2, codebook_size=8,
                            return_zeros_for_masked_padding=False).eval()
    tokens = randn(2, 7, 6, seed=29)
    token_mask = randn(2, 7, seed=30) > 0
    out, _, _ = keep_input(tokens, mask=token_mask)
    assert torch.equal(out[~token_mask], tokens[~token_mask])

    # all masked: zero losses and output, -1 everywhere, no buffer touched, k-means waits
    for kmeans in (False, True):
        layer = ResidualVQ(dim=6, num_quantizers=2, codebook_size=8, kmeans_init=kmeans).train()
        saved = codebook_state(layer)
        nothing = torch.zeros(2, 3, 4, dtype=torch.bool)
        out, indices, losses = layer(x.permute(0, 2, 3, 1).reshape(2, 12, 6), mask=nothing.reshape(2, 12))
        assert (indices == -1).all() and (out == 0).all() and (losses == 0).all()
        assert_buffers_equal(layer, saved)


# ------------------------------------------------------------------------------------------
# forward with given indices: teacher-forced cross-entropy


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("dim", [4, 9], ids=["no_proj", "proj"])
def test_forward_with_indices_is_teacher_forced_cross_entropy(dim, masked, train):
    q, k = 3, 8
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=dim, codebook_dim=4, num_quantizers=q, codebook_size=k).train(train)
    set_codebooks(rvq, seed=31)
    x = randn(2, 9, dim, seed=32).requires_grad_(True)
    given_indices = torch.randint(0, k, (2, 9, q), generator=torch.Generator().manual_seed(33))
    keep = randn(2, 9, seed=34) > -0.3 if masked else None
    saved = codebook_state(rvq)
    out, ce = rvq(x, indices=given_indices, mask=keep)
    assert_buffers_equal(rvq, saved)  # no update from a teacher-forced forward
    assert ce.shape == () and ce.dtype == torch.float32
    assert out.shape == x.shape and out.dtype == x.dtype

    x64 = x.detach().to(F64).requires_grad_(True)
    z = linear64(rvq.project_in, x64) if rvq.has_projections else x64
    expected = teacher_forced_ce64(z, books64(rvq), given_indices, keep)
    close(ce, expected, rtol=1e-5, atol=1e-6)
    # the output is that of the given codes (zeros where masked)
    decoded = rvq.get_output_from_indices(given_indices)
    kept = torch.ones(2, 9, dtype=torch.bool) if keep is None else keep
    assert torch.equal(out[kept], decoded[kept])
    assert (out[~kept] == 0).all()
    # the gradient reaches the input as the fp64 formula's does
    ce.backward()
    expected.backward()
    close(x.grad, x64.grad, rtol=1e-4, atol=1e-6)


def test_forward_with_indices_differs_from_cross_entropy_on_the_input():
    """The peer's variant (every stage's CE on x itself) differs: stage k > 0 must see the residual."""
    torch.manual_seed(0)
    rvq = set_codebooks(ResidualVQ(dim=3, num_quantizers=3, codebook_size=8).eval(), seed=35)
    x = randn(2, 10, 3, seed=36)
    given_indices = torch.randint(0, 8, (2, 10, 3), generator=torch.Generator().manual_seed(37))
    _, ce = rvq(x, indices=given_indices)
    books = books64(rvq)
    on_input = sum(teacher_forced_ce64(x.to(F64), [books[s]], given_indices[..., s:s + 1]) for s in range(3))
    assert abs(float(ce) - float(on_input)) > 1e-3
    close(ce, teacher_forced_ce64(x.to(F64), books, given_indices), rtol=1e-5, atol=1e-6)


def test_forward_with_indices_on_images():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, codebook_dim=3, num_quantizers=2, codebook_size=8, accept_image_fmap=True).eval()
    x = randn(2, 6, 3, 4, seed=38)
    out, indices, _ = rvq(x)
    rec, ce = rvq(x, indices=indices)  # (b, h, w, q)
    assert torch.equal(rec, out)
    tokens = x.permute(0, 2, 3, 1)
    expected = teacher_forced_ce64(linear64(rvq.project_in, tokens), books64(rvq), indices)
    close(ce, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# drop-in for vector-quantize-pytorch


PEER_CONFIGS = [
    dict(dim=8, num_quantizers=3, codebook_size=16),
    dict(dim=12, num_quantizers=3, codebook_size=16, codebook_dim=4),
    dict(dim=12, num_quantizers=4, codebook_size=16, codebook_dim=4, quantize_dropout=True,
         quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
    dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True),
    dict(dim=8, num_quantizers=2, codebook_size=16, kmeans_init=True, kmeans_iters=3, decay=0.9, eps=1e-4,
         threshold_ema_dead_code=1, commitment_weight=0.5, rotation_trick=False),
    dict(dim=8, num_quantizers=2, codebook_size=16, use_cosine_sim=True, orthogonal_reg_weight=0.1,
         return_zeros_for_masked_padding=False),
    dict(dim=8, num_quantizers=2, codebook_size=16, learnable_codebook=True, ema_update=False,
         commitment_use_cross_entropy_loss=True),
    dict(dim=8, num_quantizers=2, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.5,
         straight_through=True, rotation_trick=False, codebook_diversity_loss_weight=0.1, heads=1),
]


@pytest.mark.parametrize("kwargs", PEER_CONFIGS, ids=range(len(PEER_CONFIGS)))
def test_same_keywords_state_dict_and_call_structure_as_peer(kwargs):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    peer = peer_module.ResidualVQ(**kwargs)
    ours = ResidualVQ(**kwargs)
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict())  # strict, both ways
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 7, kwargs["dim"], seed=39).requires_grad_(True)
    for train in (True, False):
        ours.train(train), peer.train(train)
        for all_codes in (False, True):
            ours_out = ours(x, return_all_codes=all_codes, rand_quantize_dropout_fixed_seed=3)
            peer_out = peer(x, return_all_codes=all_codes, rand_quantize_dropout_fixed_seed=3)
            assert call_structure(ours_out) == call_structure(peer_out)
    assert ours.codebook_size == peer.codebook_size
    assert ours.codebooks.shape == peer.codebooks.shape


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("dim", [6, 12], ids=["no_proj", "proj"])
def test_same_codes_and_outputs_as_peer(dim, masked):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=dim, codebook_dim=6, num_quantizers=3, codebook_size=32, rotation_trick=False,
                  kmeans_init=False, decay=0.8)
    torch.manual_seed(0)
    peer = peer_module.ResidualVQ(**kwargs)
    ours = ResidualVQ(**kwargs)
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 25, dim, seed=40)
    mask = randn(2, 25, seed=41) > -0.5 if masked else None
    peer.eval(), ours.eval()
    p_out, p_idx, _, p_codes = peer(x, mask=mask, return_all_codes=True)
    o_out, o_idx, _, o_codes = ours(x, mask=mask, return_all_codes=True)
    kept = torch.ones(2, 25, dtype=torch.bool) if mask is None else mask
    assert torch.equal(o_idx[kept], p_idx.long()[kept])
    close(o_out, p_out, rtol=1e-6, atol=1e-6)
    close(o_codes[:, kept], p_codes[:, kept], rtol=0, atol=0)
    if mask is None:
        close(ours.get_output_from_indices(o_idx), peer.get_output_from_indices(p_idx), rtol=1e-6, atol=1e-6)
    # one training step (non-shared: no documented difference): same codes, same EMA buffers
    peer.train(), ours.train()
    p_out, p_idx, p_losses = peer(x, mask=mask)
    o_out, o_idx, o_losses = ours(x.clone().requires_grad_(True), mask=mask)
    assert torch.equal(o_idx[kept], p_idx.long()[kept])
    # the peer's masked commitment loss is documented as wrong with projections
    if not ours.has_projections or mask is None:
        close(o_losses, p_losses, rtol=1e-5, atol=1e-7)
    peer_state = peer.state_dict()
    for name, buf in ours.state_dict().items():
        close(buf.float(), peer_state[name].float(), rtol=1e-5, atol=1e-6, msg=f"state {name}")


def test_drop_in_signatures_and_unprovided_keywords():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    unprovided = set()
    for name in ("ResidualVQ", "GroupedResidualVQ"):
        ours = {"ResidualVQ": ResidualVQ, "GroupedResidualVQ": GroupedResidualVQ}[name]
        peer = getattr(peer_module, name)
        for method in ("__init__", "forward", "get_output_from_indices", "get_codes_from_indices"):
            theirs = {p.name for p in inspect.signature(getattr(peer, method)).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - unprovided
            mine = set(inspect.signature(getattr(ours, method)).parameters)
            assert theirs <= mine, f"{name}.{method} lacks {theirs - mine}"


def test_grouped_same_as_peer():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=12, groups=2, num_quantizers=3, codebook_size=16, codebook_dim=4, rotation_trick=False)
    torch.manual_seed(0)
    peer = peer_module.GroupedResidualVQ(**kwargs).eval()
    ours = GroupedResidualVQ(**kwargs).eval()
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 9, 12, seed=42)
    for all_codes in (False, True):
        o, p = ours(x, return_all_codes=all_codes), peer(x, return_all_codes=all_codes)
        assert len(o) == len(p)
        assert call_structure(o[:3]) == call_structure(p[:3])
        assert torch.equal(o[1], p[1].long())
        close(o[0], p[0], rtol=1e-6, atol=1e-6)
        if all_codes:  # ours stacks the groups' codes (g, q, b, n, d); the peer returns a tuple of them
            close(o[3], torch.stack(p[3]), rtol=0, atol=0)
    assert ours.codebooks.shape == peer.codebooks.shape


# ------------------------------------------------------------------------------------------
# bad configuration and input


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(heads=2), "heads"),
        (dict(channel_last=False), "channel_last"),
        (dict(accept_3d_fmap=True), "accept_3d_fmap"),
        (dict(separate_codebook_per_head=True), "separate_codebook_per_head"),
        (dict(num_quantizers=0), "num_quantizers"),
        (dict(quantize_dropout=True, quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
        (dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(dim=0), "dim"),
        (dict(decay=1.5), "decay"),
    ],
    ids=["heads", "channel_last", "3d_fmap", "separate_codebooks", "q_0", "cutoff", "multiple_of", "size_0",
         "dim_0", "decay"],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    base = dict(dim=8, num_quantizers=3, codebook_size=16)
    with pytest.raises((ValueError, TypeError), match=name):
        ResidualVQ(**{**base, **kwargs})


def test_bad_input_raises_naming_the_argument():
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16)
    with pytest.raises(ValueError, match="dim 12.*got 10"):
        rvq(randn(2, 5, 10))
    with pytest.raises(ValueError, match="dim"):
        ResidualVQ(dim=12, num_quantizers=2, codebook_size=8, accept_image_fmap=True)(randn(2, 10, 3, 12))
    with pytest.raises(TypeError, match="input"):
        rvq(torch.ones(2, 5, 12, dtype=torch.long))
    x = randn(2, 5, 12)
    with pytest.raises(ValueError, match="mask"):
        rvq(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        rvq(x, mask=torch.ones(2, 5))


@pytest.mark.parametrize(
    "bad,error",
    [
        (torch.full((2, 5, 3), 16), ValueError),  # == codebook_size
        (torch.full((2, 5, 3), -1), ValueError),  # dropped stages cannot be teacher-forced
        (torch.zeros(2, 5, 2, dtype=torch.long), ValueError),  # too few quantizers
        (torch.zeros(2, 4, 3, dtype=torch.long), ValueError),  # wrong length
        (torch.zeros(2, 5, 3), TypeError),  # float
    ],
    ids=["too_large", "minus_one", "few_quantizers", "wrong_n", "float"],
)
def test_forward_with_bad_indices_raises(bad, error):
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16).train()
    saved = codebook_state(rvq)
    with pytest.raises(error, match="indices"):
        rvq(randn(2, 5, 12), indices=bad)
    assert_buffers_equal(rvq, saved)


@pytest.mark.parametrize(
    "bad,error",
    [
        (torch.full((2, 5, 3), 16), ValueError),  # == codebook_size
        (torch.full((2, 5, 3), -2), ValueError),  # below -1 (the only marker)
        (torch.zeros(2, 5, 4, dtype=torch.long), ValueError),  # more quantizers than layers
        (torch.tensor(3), ValueError),  # no quantizer axis
        (torch.zeros(2, 5, 3), TypeError),  # float
        (torch.zeros(2, 5, 3, dtype=torch.bool), TypeError),  # bool
    ],
    ids=["too_large", "below_minus_one", "many_quantizers", "scalar", "float", "bool"],
)
@pytest.mark.parametrize("method", ["get_output_from_indices", "get_codes_from_indices"])
def test_decoding_bad_indices_raises(method, bad, error):
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16)
    with pytest.raises(error, match="indices"):
        getattr(rvq, method)(bad)


def test_non_finite_training_input_raises_before_touching_buffers():
    for shared in (False, True):
        rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=shared).train()
        saved = codebook_state(rvq)
        x = randn(2, 5, 4)
        x[1, 2, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            rvq(x.requires_grad_(True))
        assert_buffers_equal(rvq, saved)


def test_compile_fullgraph_training_matches_eager():
    """torch.compile(fullgraph=True): every stage's EMA step, the output and the gradients as
    eager; a NaN batch raises before any stage's buffers changed."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    assert_compiled_matches_eager(rvq, (2, 12, 8), mask=True)


@pytest.mark.parametrize("shape", [(2, 0, 12), (0, 5, 12), (3, 12)], ids=["n0", "b0", "2d"])
def test_empty_and_2d_inputs(shape):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16).eval()
    x = randn(*shape, seed=43)
    out, indices, losses = rvq(x)
    assert out.shape == x.shape and indices.shape == (*shape[:-1], 3) and losses.shape == (3,)
    assert torch.equal(rvq.get_output_from_indices(indices), out)
    rvq.train()
    saved = codebook_state(rvq)
    if x.numel() == 0:  # an empty training batch leaves the statistics alone
        out, indices, losses = rvq(x.requires_grad_(True))
        assert out.shape == x.shape and (losses == 0).all()
        assert_buffers_equal(rvq, saved)


# ------------------------------------------------------------------------------------------
# dtype matrix and state dict


def unpack_residual(result) -> Parts:
    """(output, indices, losses (q,) or (g, q)[, all codes]): the loss vector is the losses."""
    out, indices, losses, *rest = result
    return Parts(out, indices=[indices], losses=[losses], others=list(rest))


def _proj_layer():
    return ResidualVQ(dim=16, codebook_dim=4, num_quantizers=3, codebook_size=16)


def _proj_input(dtype):
    return randn(2, 8, 16, seed=44).to(dtype)


def _no_proj_layer():
    return ResidualVQ(dim=4, num_quantizers=3, codebook_size=16)


def _no_proj_input(dtype):
    return randn(2, 16, 4, seed=45, scale=0.3).to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    res = run_cell(cell, _proj_layer, _proj_input, unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 8, 3) and ((indices >= 0) & (indices < 16)).all()
    assert res.parts.output.shape == (2, 8, 16)
    assert res.parts.losses[0].shape == (3,)

    # state dict round trip: a fresh module of the same dtype loads it and gives the same eval outputs
    fresh = _proj_layer().to(device=cell.device, dtype=DTYPES[cell.module_dtype])
    fresh.load_state_dict(res.layer.state_dict())
    res.layer.eval(), fresh.eval()
    x = res.x.detach()
    with cell.autocast_context():
        a, b = res.layer(x), fresh(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # without projections the codes depend on the input values only; in training the step searched
    # the codebooks run_cell's layer started from (seed 0)
    res = run_cell(cell, _no_proj_layer, _no_proj_input, unpack=unpack_residual)
    torch.manual_seed(0)
    start = _no_proj_layer()
    ref = reference_layer(start, res.x.detach().float().cpu())
    ok = assert_indices_match(res.parts.indices[0].cpu(), ref)
    tol = dict(rtol=1e-6, atol=1e-6) if cell.input_dtype == "fp32" else dict(rtol=1e-2, atol=1e-3)
    close(res.parts.output.float().cpu()[ok], ref.out[ok], **tol)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_quantize_dropout_image_all_codes(cell):
    res = run_cell(cell, lambda: ResidualVQ(dim=16, codebook_dim=4, num_quantizers=3, codebook_size=16,
                                            quantize_dropout=True, accept_image_fmap=True),
                   lambda dtype: randn(2, 16, 3, 4, seed=46).to(dtype),
                   forward=lambda layer, x: layer(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1),
                   unpack=unpack_residual)
    (all_codes,) = res.parts.others
    (indices,) = res.parts.indices
    assert all_codes.shape == (3, 2, 3, 4, 4)
    assert indices.shape == (2, 3, 4, 3) and res.parts.output.shape == (2, 16, 3, 4)
    kept = random.Random(1).randrange(0, 3) + 1 if cell.train else 3
    assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
    assert (all_codes[kept:] == 0).all()


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_grouped(cell):
    res = run_cell(cell, lambda: GroupedResidualVQ(dim=16, groups=2, codebook_dim=4, num_quantizers=3,
                                                   codebook_size=16, quantize_dropout=True),
                   _proj_input, unpack=unpack_residual)
    (indices,) = res.parts.indices
    assert indices.shape == (2, 2, 8, 3)
    assert res.parts.losses[0].shape == (2, 3)
    assert res.parts.output.shape == (2, 8, 16)


@pytest.mark.parametrize("shared", [False, True])
def test_state_dict_round_trip_after_training(shared):
    torch.manual_seed(0)
    a = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared,
                   kmeans_init=True, threshold_ema_dead_code=1).train()
    for step in range(2):
        a(randn(2, 10, 12, seed=47 + step).requires_grad_(True))
    torch.manual_seed(1)
    b = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared,
                   kmeans_init=True, threshold_ema_dead_code=1)
    b.load_state_dict(a.state_dict())
    if shared:
        assert all(layer._codebook is b.layers[0]._codebook for layer in b.layers)
    a.eval(), b.eval()
    x = randn(2, 10, 12, seed=49)
    out_a, idx_a, _ = a(x)
    out_b, idx_b, _ = b(x)
    assert torch.equal(out_a, out_b) and torch.equal(idx_a, idx_b)
    assert torch.equal(b.get_output_from_indices(idx_a), out_a)
    assert all(bool(layer._codebook.initted) for layer in b.layers)
    # half precision: the statistics stay fp32 and load all the same
    half = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16, shared_codebook=shared).half()
    half.load_state_dict(a.state_dict())
    assert all(layer._codebook.embed.dtype == torch.float32 for layer in half.layers)
    out_half, _, _ = half.eval()(x.half())
    assert out_half.dtype == torch.float16 and torch.isfinite(out_half).all()
    assert half.project_in.weight.dtype == torch.float16


@pytest.mark.parametrize("dropout", [False, True])
def test_code_usage_matches_brute_force(dropout):
    q = 3
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=q, codebook_size=8, quantize_dropout=dropout).train(dropout)
    x = randn(2, 20, 4, seed=50).requires_grad_(dropout)
    _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=1)
    if dropout:
        assert (indices == -1).any()
    usage = rvq.code_usage(indices)
    for field in usage:
        assert field.shape == (q,)
    for k in range(q):
        ppl, frac, used = brute_force_usage(indices[..., k], rvq.codebook_size)
        assert math.isclose(float(usage.perplexity[k]), ppl, rel_tol=1e-5)
        assert math.isclose(float(usage.usage[k]), frac, rel_tol=1e-6)
        assert int(usage.codes_used[k]) == used


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


# ------------------------------------------------------------------------------------------
# VectorQuantize's statistics extras through a shared codebook


@pytest.mark.parametrize("masked", [False, True])
def test_shared_codebook_in_place_optimizer_steps_once_on_every_stages_loss(masked):
    """As vector-quantize-pytorch (manual_in_place_optimizer_update on every stage, one step at
    the end): every stage searches the codebook as it was before the step; one SGD step on the sum
    of the stages' mean((code - sg(residual))^2), against an fp64 reference."""
    lr = 0.5
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=True, learnable_codebook=True,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=lr)).train()
    first = rvq.layers[0]
    assert all(layer.in_place_codebook_optimizer is first.in_place_codebook_optimizer for layer in rvq.layers)
    embed = first._codebook.embed
    codes = embed.detach()[0].to(F64).clone()
    x = randn(2, 7, 4, seed=3)
    keep = torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    kept = torch.ones(2, 7, dtype=torch.bool) if keep is None else keep
    residual, grad, path = x.to(F64)[kept], torch.zeros(8, 4, dtype=F64), []
    for _ in range(3):
        idx = torch.cdist(residual, codes).argmin(-1)
        grad.index_add_(0, idx, 2 * (codes[idx] - residual) / residual.numel())
        residual, path = residual - codes[idx], path + [idx]
    _, indices, _ = rvq(x, mask=keep)
    assert torch.equal(indices[kept], torch.stack(path, -1))
    torch.testing.assert_close(embed.detach()[0].to(F64), codes - lr * grad, rtol=1e-5, atol=1e-6)


def test_shared_codebook_with_affine_param_raises():
    with pytest.raises(ValueError, match="affine_param, shared_codebook"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, shared_codebook=True, affine_param=True)
    ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, affine_param=True)  # each stage its own moments
