"""Tests of ResidualVQ against an fp64 re-implementation of the scheme (rvq_reference.py): the
residual property, decoding from indices, masks and teacher forcing. The other topics are in
test_residual_vq_training.py (quantize dropout, EMA, dead codes, k-means, distributed),
test_residual_vq_shared_codebook.py, test_residual_vq_peer.py, test_residual_vq_validation.py and
test_residual_vq_dtypes.py (dtype matrix, state dict); GroupedResidualVQ in test_grouped_residual_vq.py.

The references are written from the description (SoundStream, arXiv 2107.03312,
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
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import close, linear64, randn
from rvq_reference import (
    assert_buffers_equal,
    assert_indices_match,
    assert_stagewise_argmin,
    books64,
    codebook_state,
    project_in64,
    project_out64,
    reference,
    reference_layer,
    set_codebooks,
    teacher_forced_ce64,
)
from vq_layers import ResidualVQ

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
