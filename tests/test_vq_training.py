"""VectorQuantize's training losses, gradients, learnable codebooks, argument validation and
2-process training, against the fp64 references of vq_reference.py (tests/test_vq.py's
docstring describes them)."""


from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_in_processes
from reference import close, randn, rotation_vjp64
from vq_layers import VectorQuantize
from vq_reference import (
    F64,
    as_bnh,
    assert_buffers_equal,
    brute,
    buffers,
    check_indices,
    codes_at,
    head_codebooks,
    spread_codebook,
    z64,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ------------------------------------------------------------------------------------------
# losses


def kept_or_all(z, keep):
    return z.reshape(-1, *z.shape[2:]) if keep is None else z[keep]


def logits64(z, cbs, cosine, scale=1.0):
    """z (m, h, d), cbs (h, K, d) -> (m, h, K): -||z - c|| (Euclidean) or z . c, times scale."""
    if cosine:
        return torch.einsum("mhd,hkd->mhk", z, cbs) * scale
    return -(z.unsqueeze(-2) - cbs).square().sum(-1).sqrt() * scale


COMMIT_CONFIGS = {
    "plain": dict(dim=6, codebook_size=12),
    "heads_proj": dict(dim=7, codebook_size=12, heads=2, codebook_dim=3),
    "separate": dict(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=True),
    "cosine": dict(dim=6, codebook_size=12, use_cosine_sim=True),
}


def commitment_step(name, masked, seed, **kwargs):
    """One training step of a COMMIT_CONFIGS layer -> (x, keep, loss, breakdown, x64, z64, the
    step's codebooks (h, k, d), the fp64 brute-force indices)."""
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name], **kwargs)).train()
    x = randn(3, 10, layer.dim, seed=seed).requires_grad_(True)
    keep = (torch.rand(3, 10, generator=torch.Generator().manual_seed(seed + 1)) > 0.3) if masked else None
    cbs = head_codebooks(layer).clone()
    _, _, loss, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    z = z64(layer, x64)
    idx, clear = brute(layer, z.detach(), cbs)
    assert clear.all()
    return layer, x, keep, loss, breakdown, x64, z, cbs, idx


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(COMMIT_CONFIGS))
def test_commitment_loss(name, masked):
    layer, x, keep, loss, breakdown, x64, z, cbs, idx = commitment_step(name, masked, 37, commitment_weight=0.7)
    zk, ck = kept_or_all(z, keep), kept_or_all(codes_at(cbs, idx), keep)
    expected = (zk - ck).square().mean()
    close(breakdown.commitment, expected)
    close(loss, 0.7 * expected)
    # its gradient to the input (the codes are constants)
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(0.7 * expected, x64)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(COMMIT_CONFIGS))
def test_cross_entropy_commitment_loss(name, masked):
    layer, x, keep, loss, breakdown, x64, z, cbs, idx = commitment_step(name, masked, 39,
                                                                        commitment_use_cross_entropy_loss=True)
    logp = logits64(kept_or_all(z, keep), cbs, layer.use_cosine_sim).log_softmax(-1)
    expected = -logp.gather(-1, kept_or_all(idx, keep).unsqueeze(-1)).mean()
    close(breakdown.commitment, expected)
    close(loss, expected)
    # its gradient to the input: the softmax over the codebook the codes were chosen from
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x64)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 100.0])
@pytest.mark.parametrize("name", ["plain", "heads_proj", "separate", "cosine"])
def test_codebook_diversity_loss(name, temperature):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name], commitment_weight=0.0,
                                           codebook_diversity_loss_weight=0.3,
                                           codebook_diversity_temperature=temperature)).train()
    x = randn(3, 10, layer.dim, seed=41).requires_grad_(True)
    keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(42)) > 0.2
    cbs = head_codebooks(layer).clone()
    _, _, loss, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    p = logits64(kept_or_all(z64(layer, x64), keep), cbs, layer.use_cosine_sim, temperature).softmax(-1)  # (m, h, K)
    if layer.separate_codebook_per_head:
        avg = p.mean(0)  # (h, K): one distribution per codebook
    else:
        avg = p.reshape(-1, p.shape[-1]).mean(0, keepdim=True)  # heads pooled on one codebook
    expected = (torch.special.xlogy(avg, avg).sum(-1)).mean()  # -entropy
    close(breakdown.codebook_diversity, expected, rtol=1e-5, atol=1e-6)
    close(loss, 0.3 * expected, rtol=1e-5, atol=1e-6)
    close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(0.3 * expected, x64)[0], rtol=1e-4, atol=1e-7)


def test_codebook_diversity_gradient_is_finite_with_an_unreachable_code():
    """At the default temperature (100) a code far from every token has mean probability 0 in
    fp32; the loss's true gradient is finite (p log p -> 0 smoothly), so must be the layer's."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=6, commitment_weight=0.0, codebook_diversity_loss_weight=1.0,
                           freeze_codebook=True).train()
    codes = randn(6, 4, seed=60)
    codes[5] += 50.0
    layer.codebook = codes
    x = randn(2, 8, 4, seed=61).requires_grad_(True)
    _, _, loss = layer(x)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    x64 = x.detach().to(F64).requires_grad_(True)
    p = logits64(x64.reshape(-1, 1, 4), codes.to(F64)[None], False, 100.0).softmax(-1).reshape(-1, 6)
    avg = p.mean(0)
    # the far code's mean probability underflows even in fp64 (exp(-5000)): its term's exact
    # gradient is 0, which xlogy's backward at p = 0 would turn into -inf * 0 = NaN
    expected = torch.special.xlogy(avg, avg.clamp(min=torch.finfo(F64).tiny)).sum()
    close(loss, expected)
    (ref,) = torch.autograd.grad(expected, x64)
    assert torch.isfinite(ref).all()
    close(grad, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("active_only", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_orthogonal_regularization(active_only, separate):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, heads=2, codebook_dim=3, separate_codebook_per_head=separate,
                           commitment_weight=0.0, orthogonal_reg_weight=2.0,
                           orthogonal_reg_active_codes_only=active_only)
    spread_codebook(layer).train()
    cbs = layer._codebook.embed.detach().to(F64).clone().requires_grad_()  # (g, K, d)
    x = randn(2, 4, 6, seed=43)  # few vectors: not every code is active
    _, indices, loss, breakdown = layer(x, return_loss_breakdown=True)
    idx = as_bnh(layer, indices, 2)
    losses = []
    for g in range(cbs.shape[0]):
        c = cbs[g]
        if active_only:
            used = idx[..., g].unique() if separate else idx.unique()
            assert used.numel() < 12
            c = c[used]
        cn = c / c.norm(dim=-1, keepdim=True)
        k = cn.shape[0]
        losses.append((cn @ cn.t()).square().sum() / k**2 - 1 / k)
    expected = torch.stack(losses).mean()
    close(breakdown.orthogonal_reg, expected)
    close(loss, 2.0 * expected.detach())
    # it reaches the codebook as the gradient of the codebook this step searched, although the
    # step's EMA update rewrote the codes before the backward ran
    loss.backward()
    (2.0 * expected).backward()
    assert layer._codebook.embed.grad.abs().sum() > 0
    close(layer._codebook.embed.grad, cbs.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["plain", "separate", "cosine"])
def test_forward_with_given_indices_returns_cross_entropy(name, train):
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(**COMMIT_CONFIGS[name])).train(train)
    x = randn(2, 8, layer.dim, seed=44)
    shape = (2, 8) if layer.heads == 1 else (2, 8, layer.heads)
    given = torch.randint(0, 12, shape, generator=torch.Generator().manual_seed(45))
    given.view(-1)[::5] = -1  # ignored
    cbs = head_codebooks(layer).clone()
    result = layer(x, indices=given)
    assert isinstance(result, tuple) and len(result) == 2
    quantized, ce = result
    assert quantized.shape == x.shape and ce.dtype == torch.float32
    g = as_bnh(layer, given, 2).reshape(-1, layer.heads)
    logp = logits64(z64(layer, x).reshape(-1, layer.heads, layer.codebook_dim), cbs,
                    layer.use_cosine_sim).log_softmax(-1)
    valid = g >= 0
    picked = logp.gather(-1, g.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(ce, -(picked[valid]).mean())


# ------------------------------------------------------------------------------------------
# gradients: rotation trick, straight-through, stochastic sampling


@pytest.mark.parametrize("heads", [1, 2])
def test_rotation_trick_input_gradient(heads):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, heads=heads, codebook_dim=6 // heads)
    assert layer.rotation_trick  # on by default
    spread_codebook(layer).train()
    x = randn(2, 10, 6, seed=46).requires_grad_(True)
    cbs = head_codebooks(layer).clone()
    out, indices, _ = layer(x)
    g = randn(2, 10, 6, seed=47)
    (grad,) = torch.autograd.grad(out, x, g)
    d = 6 // heads
    z = x.detach().to(F64).reshape(-1, d)
    q = codes_at(cbs, as_bnh(layer, indices, 2)).reshape(-1, d)
    ref = rotation_vjp64(z, q, g.to(F64).reshape(-1, d)).reshape(2, 10, 6)
    close(grad, ref, rtol=1e-5, atol=1e-5)
    assert (grad - g).abs().max() > 1e-2  # not plain straight-through


def test_plain_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    layer = spread_codebook(VectorQuantize(dim=6, codebook_size=12, rotation_trick=False)).train()
    x = randn(2, 10, 6, seed=48).requires_grad_(True)
    g = randn(2, 10, 6, seed=49)
    (grad,) = torch.autograd.grad(layer(x)[0], x, g)
    assert torch.equal(grad, g)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gumbel_straight_through_gradient(temperature):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=12, straight_through=True, stochastic_sample_codes=True,
                           sample_codebook_temp=temperature)
    assert not layer.rotation_trick
    spread_codebook(layer).train()
    cb = layer.codebook.detach().to(F64).clone()
    x = randn(2, 10, 6, seed=50).requires_grad_(True)
    g = randn(2, 10, 6, seed=51)
    out, _, _ = layer(x)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.isfinite(grad).all()
    assert (grad - g).abs().max() > 1e-3  # differs from plain straight-through
    # the gradient of the expected code softmax(-||x - c|| / t) @ C (Gumbel-softmax estimator)
    x64 = x.detach().to(F64).requires_grad_(True)
    probs = (-(x64.unsqueeze(-2) - cb).square().sum(-1).sqrt() / temperature).softmax(-1)
    (ref,) = torch.autograd.grad(probs @ cb, x64, g.to(F64))
    close(grad, ref, rtol=1e-4, atol=1e-5)


def test_stochastic_sampling_in_training_only_and_reproducible():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=1.0,
                           freeze_codebook=True)
    spread_codebook(layer)
    x = randn(4, 50, 4, seed=52)
    cb = layer.codebook.detach().clone()
    _, eval_idx, _ = layer.eval()(x)
    _, eval_idx2, _ = layer(x)
    assert torch.equal(eval_idx, eval_idx2)
    idx, clear = check_indices(layer, x, eval_idx, cb)
    layer.train()
    torch.manual_seed(7)
    _, a, _ = layer(x)
    torch.manual_seed(7)
    _, b, _ = layer(x)
    torch.manual_seed(8)
    _, c, _ = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != idx[..., 0]).float().mean() > 0.05  # sampled, not the argmin
    # a zero temperature is the argmin again
    _, d, _ = layer(x, sample_codebook_temp=0.0)
    assert torch.equal(d[clear], idx[..., 0][clear])


# ------------------------------------------------------------------------------------------
# validation


def test_bad_inputs_raise_naming_the_argument():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8).train()
    x = randn(2, 5, 6, seed=53)
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        layer(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="lens"):
        layer(x, mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.tensor([5, 5]))
    with pytest.raises((ValueError, TypeError), match="lens"):
        layer(x, lens=torch.tensor([5.0, 5.0]))
    with pytest.raises((ValueError, TypeError), match="indices"):
        layer.get_output_from_indices(torch.tensor([[0, 8]]))
    with pytest.raises((ValueError, TypeError), match="indices"):
        layer.get_output_from_indices(torch.tensor([[0, -2]]))
    with pytest.raises(TypeError, match="indices"):
        layer.get_output_from_indices(torch.tensor([[0.0, 1.0]]))
    image = VectorQuantize(dim=6, codebook_size=8, accept_image_fmap=True)
    with pytest.raises(ValueError, match="input"):
        image(randn(2, 6, 5))
    with pytest.raises(ValueError, match="input"):
        VectorQuantize(dim=6, codebook_size=8, accept_3d_fmap=True)(randn(2, 6, 3, 4))


@pytest.mark.parametrize("kmeans_init", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_input_raises_before_any_buffer_changes(bad, kmeans_init):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=8, codebook_dim=4, kmeans_init=kmeans_init,
                           threshold_ema_dead_code=1.0).train()
    x = randn(2, 5, 6, seed=54)
    x[1, 3, 2] = bad
    before = buffers(layer)
    with pytest.raises(ValueError, match="input"):
        layer(x)
    assert_buffers_equal(before, layer)


@pytest.mark.parametrize("kwargs,name", [
    (dict(codebook_size=0), "codebook_size"),
    (dict(codebook_size=-3), "codebook_size"),
    (dict(codebook_size=2.5), "codebook_size"),
    (dict(codebook_size="8"), "codebook_size"),
    (dict(heads=0), "heads"),
    (dict(decay=1.5), "decay"),
    (dict(decay=-0.1), "decay"),
    (dict(codebook_dim=0), "codebook_dim"),
    (dict(rotation_trick=True, straight_through=True), "rotation_trick"),
    (dict(ema_update=True, learnable_codebook=True), "ema_update"),
    (dict(accept_image_fmap=True, accept_3d_fmap=True), "accept_"),
    (dict(commitment_weight=-1.0), "commitment_weight"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    kw = dict(dim=6, codebook_size=8)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=name):
        VectorQuantize(**kw)


# ------------------------------------------------------------------------------------------
# learnable codebook


def test_learnable_codebook_gets_the_commitment_gradient():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, ema_update=False).train()
    assert isinstance(layer._codebook.embed, torch.nn.Parameter)
    spread_codebook(layer)
    x = randn(2, 8, 6, seed=55)
    before = buffers(layer)
    cb = layer.codebook.detach().to(F64).clone()
    _, indices, loss = layer(x)
    loss.backward()
    grad = layer._codebook.embed.grad[0]
    # d/dC mean((z - C[idx])^2) = -2 sum_{rows choosing k} (z - c_k) / (N d)
    z = x.to(F64).reshape(-1, 6)
    idx = indices.reshape(-1)
    ref = torch.zeros_like(cb)
    ref.index_add_(0, idx, -2 * (z - cb[idx]) / z.numel())
    close(grad, ref, rtol=1e-5, atol=1e-7)
    # no EMA: the statistics and the codes as they were
    assert_buffers_equal(before, layer)


def test_learnable_codebook_in_bf16():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, codebook_dim=4, learnable_codebook=True,
                           ema_update=False).bfloat16().train()
    assert layer._codebook.embed.dtype == torch.bfloat16
    assert layer._codebook.cluster_size.dtype == torch.float32
    x = randn(2, 8, 6, seed=56).bfloat16().requires_grad_(True)
    out, _, loss = layer(x)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (out.float().square().mean() + loss).backward()
    grad = layer._codebook.embed.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------
# distributed (2-process gloo)


WORLD = 2


def _rank_batch(step, rank, dim):
    return randn(2, 6, dim, seed=1000 + 10 * step + rank)


def _gathered_equal(t):
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _dist_worker(rank, world):
    # 1. EMA: identical on every rank, equal to one process on the concatenated batches
    for kwargs in (dict(dim=6, codebook_size=12),
                   dict(dim=7, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=True)):
        torch.manual_seed(0)
        layer = VectorQuantize(**kwargs).train()
        single = VectorQuantize(**kwargs, sync_codebook=False).train()
        single.load_state_dict(layer.state_dict())
        for step in range(3):
            xs = [_rank_batch(step, r, kwargs["dim"]) for r in range(world)]
            layer(xs[rank])
            single(torch.cat(xs))
        for key, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{key} differs across ranks"
            torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer._codebook.embed_avg, VectorQuantize(**kwargs)._codebook.embed_avg)
    # 2. k-means init and dead-code replacement: identical on every rank
    torch.manual_seed(rank)  # different local random state on purpose
    layer = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=4,
                           threshold_ema_dead_code=2.0).train()
    replaced = 0
    for step in range(3):
        x = _rank_batch(step, rank, 4) * (1 + rank)  # ranks see different data
        layer(x)
        replaced += int(layer._codebook.dead_codes_replaced)
        for key, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{key} differs across ranks after step {step}"
    assert bool(layer._codebook.initted)
    assert replaced > 0  # the replacement path ran


@pytest.mark.timeout(180)
def test_distributed_ema_kmeans_and_dead_codes():
    run_in_processes(_dist_worker, WORLD, timeout=150)
