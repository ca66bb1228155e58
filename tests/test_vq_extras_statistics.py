"""VectorQuantize's statistics extras against independent fp64 references.

The references are written here from the description of each feature (vector-quantize-pytorch
1.32's semantics, vqtorch's paper for the affine reparameterization and the synchronized update
rule, arXiv 2305.08842), never by calling the code under test:

- EMA step with a per-code weight w: cs <- cs + (counts - cs) (1 - decay) w, the same for
  embed_avg with the sums; codes = embed_avg / ((cs + eps) / (total + K eps) total);
- accumulation: the counts and sums of every accumulating call are added to those of the call
  that applies them: one step on the concatenated batch;
- affine: running (biased) moments mu, var of the batch and of the codes; searched codes
  (c - mu_c) sqrt(var_b / var_c) + mu_b; EMA statistics of the batch mapped back;
- synchronized update: d loss / d code_k = v * sum of the output gradients of the tokens at k;
- in-place optimizer: one SGD step on mean((c_idx - z)^2) (gradient 2 (c_k - z_i) / (N d)).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_in_processes
from dtype_matrix import dtype_matrix, run_cell
from reference import close, randn
from vq_layers import VectorQuantize

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_unchanged(before, layer):
    after = layer.state_dict()
    assert set(before) == set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def make(seed=0, **kwargs):
    """A layer without projections whose codes are spread like the data, statistics non-trivial."""
    kwargs = dict(dict(dim=6, codebook_size=10), **kwargs)
    torch.manual_seed(seed)
    layer = VectorQuantize(**kwargs).train()
    cb = layer._codebook
    with torch.no_grad():
        embed = randn(*cb.embed.shape, seed=seed + 1)
        cb.cluster_size.copy_(randn(*cb.cluster_size.shape, seed=seed + 2).abs() + 0.5)
        cb.embed_avg.copy_(embed * smoothed64(cb.cluster_size.to(F64), cb.eps).unsqueeze(-1).float())
    layer.update_ema()  # the codes the statistics describe
    return layer


def rows64(layer, x, keep=None):
    """x (b, n, heads*d) -> per codebook [(b, n, h') rows fp64 (..., d)] and the keep mask (b, n, h')."""
    b, n, _ = x.shape
    z = x.detach().to(F64).reshape(b, n, layer.heads, layer.codebook_dim)
    keep = torch.ones(b, n, dtype=torch.bool) if keep is None else keep
    keep = keep.unsqueeze(-1).expand(b, n, layer.heads)
    if layer.separate_codebook_per_head:
        return [(z[:, :, h], keep[:, :, h]) for h in range(layer.heads)]
    return [(z, keep)]


def nearest64(rows, codes):
    """rows (..., d), codes (K, d) fp64 -> indices (...), with a check for near-ties."""
    d2 = (rows.unsqueeze(-2) - codes).square().sum(-1)
    top = d2.topk(2, dim=-1, largest=False).values
    assert ((top[..., 1] - top[..., 0]) / top[..., 1] > 1e-5).all(), "precondition: no near-tie"
    return d2.argmin(-1)


def smoothed64(cs, eps):
    total = cs.sum(-1, keepdim=True)
    return (cs + eps) / (total + cs.shape[-1] * eps) * total


def stats64(rows, keep, idx, k):
    """Counts (K,) and sums (K, d) of the kept rows by index, fp64."""
    rows, idx = rows[keep], idx[keep]
    counts = torch.zeros(k, dtype=F64).index_add_(0, idx, torch.ones(idx.shape[0], dtype=F64))
    return counts, torch.zeros(k, rows.shape[-1], dtype=F64).index_add_(0, idx, rows)


def ema64(before, stats, decay, eps, weight=None):
    """One EMA step from the state dict `before` with per-codebook (counts, sums) -> cs, ea, embed."""
    cs = before["_codebook.cluster_size"].to(F64).clone()
    ea = before["_codebook.embed_avg"].to(F64).clone()
    for g, (counts, sums) in enumerate(stats):
        if counts.sum() == 0:
            continue
        w = (1 - decay) * (torch.ones_like(counts) if weight is None else weight[g].to(F64))
        cs[g] = cs[g] + (counts - cs[g]) * w
        ea[g] = ea[g] + (sums - ea[g]) * w.unsqueeze(-1)
    return cs, ea, ea / smoothed64(cs, eps).unsqueeze(-1)


def nearest_stats64(layer, before, x, keep=None):
    codes = before["_codebook.embed"].to(F64)
    out = []
    for g, (rows, kept) in enumerate(rows64(layer, x, keep)):
        idx = nearest64(rows, codes[g])
        out.append(stats64(rows, kept, idx, layer.codebook_size))
    return out


def check_ema(layer, cs, ea, embed):
    cb = layer._codebook
    close(cb.cluster_size, cs)
    close(cb.embed_avg, ea)
    close(cb.embed, embed)


# ------------------------------------------------------------------------------------------
# ema_update_weight


@pytest.mark.parametrize("separate", [False, True])
def test_ema_update_weight_scales_each_codes_step(separate):
    kwargs = dict(heads=2, codebook_dim=3, separate_codebook_per_head=True) if separate else {}
    layer = make(**kwargs)
    g, k = layer._codebook.cluster_size.shape
    weight = torch.rand(g, k, generator=torch.Generator().manual_seed(5)) * 1.5
    weight[:, ::3] = 0.0
    x = randn(3, 14, 6, seed=6)
    keep = torch.rand(3, 14, generator=torch.Generator().manual_seed(7)) > 0.2
    before = state(layer)
    layer(x, mask=keep, ema_update_weight=weight if separate else weight[0])
    check_ema(layer, *ema64(before, nearest_stats64(layer, before, x, keep), layer._codebook.decay,
                            layer._codebook.eps, weight))
    frozen = weight == 0  # a zero weight leaves that code's statistics exactly as they were
    for key in ("cluster_size", "embed_avg"):
        assert torch.equal(getattr(layer._codebook, key)[frozen], before[f"_codebook.{key}"][frozen])


def test_ema_update_weight_of_ones_is_the_plain_step():
    a, b = make(), make()
    x = randn(2, 12, 6, seed=8)
    a(x, ema_update_weight=torch.ones(10))
    b(x)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_ema_update_weight_callable_gets_the_step_statistics():
    layer = make()
    before = state(layer)
    x = randn(2, 12, 6, seed=9)
    (counts, sums), = nearest_stats64(layer, before, x)
    seen = {}

    def weight_fn(embed_sum, cluster_size):
        seen["args"] = embed_sum.clone(), cluster_size.clone()
        return (cluster_size > 1).float()  # (1, K)

    layer(x, ema_update_weight=weight_fn)
    close(seen["args"][0][0], sums)
    close(seen["args"][1][0], counts)
    weight = (counts > 1).to(F64).unsqueeze(0)
    check_ema(layer, *ema64(before, [(counts, sums)], layer._codebook.decay, layer._codebook.eps, weight))


@pytest.mark.parametrize("bad", [torch.ones(9), torch.ones(3, 10), -torch.ones(10),
                                 torch.full((10,), float("nan"))])
def test_bad_ema_update_weight_raises_before_any_buffer_changes(bad):
    layer = make(affine_param=True)
    before = state(layer)
    with pytest.raises(ValueError, match="ema_update_weight"):
        layer(randn(2, 5, 6, seed=10), ema_update_weight=bad)
    assert_unchanged(before, layer)


def adam(params):
    return torch.optim.Adam(params, lr=0.1, weight_decay=0.1)


CALLABLE_CONFIGS = {  # state a step changes before the callable's result exists
    "plain": dict(),
    "affine": dict(affine_param=True),
    "in_place": dict(in_place_codebook_optimizer=adam, orthogonal_reg_weight=0.1),  # learnable, and EMA
    "kmeans": dict(kmeans_init=True, threshold_ema_dead_code=1.0),
    "in_place_manual": dict(in_place_codebook_optimizer=adam, orthogonal_reg_weight=0.1,
                            manual_in_place_optimizer_update=True),  # the step adds to .grad
}


@pytest.mark.parametrize("name", list(CALLABLE_CONFIGS))
def test_bad_ema_update_weight_callable_raises_before_any_buffer_changes(name):
    """The callable's result is checked once the statistics exist; whatever the step changed
    before (affine moments, k-means init, an in-place step and its optimizer's state) is undone:
    the next good step equals that of a twin that never saw the bad call."""
    kwargs = CALLABLE_CONFIGS[name]
    layer = VectorQuantize(dim=6, codebook_size=10, **kwargs).train() if name == "kmeans" else make(**kwargs)
    twin = VectorQuantize(dim=6, codebook_size=10, **kwargs).train()
    twin.load_state_dict(layer.state_dict())
    twin._codebook.sample_draws.seed.copy_(layer._codebook.sample_draws.seed)  # k-means and dead codes draw alike
    if name.startswith("in_place"):
        layer(randn(2, 5, 6, seed=9))  # optimizer state (or gradients, manual) to keep
        twin(randn(2, 5, 6, seed=9))
    before = state(layer)
    grad = layer._codebook.embed.grad
    grad = None if grad is None else grad.clone()
    x = randn(2, 5, 6, seed=10)
    with pytest.raises(ValueError, match="ema_update_weight"):
        layer(x, ema_update_weight=lambda s, c: torch.ones(4))
    assert_unchanged(before, layer)
    after = layer._codebook.embed.grad
    assert (grad is None and after is None) or torch.equal(grad, after)
    for good in (layer, twin):
        good(x, ema_update_weight=lambda s, c: (c > 0).float())
    for key, value in twin.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    if name == "in_place":
        a, b = layer.in_place_codebook_optimizer.state_dict(), twin.in_place_codebook_optimizer.state_dict()
        assert a["state"][0]["step"] == b["state"][0]["step"] == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][0][key], b["state"][0][key]), key


def test_a_tensor_ema_update_weight_is_checked_once_per_step(monkeypatch):
    """Checked at the boundary (one host sync), not again by the codebook."""
    from vq_layers import codebook, ema
    from vq_layers.layers import vq as vq_module

    calls = []

    def counted(*args):
        calls.append(args)
        return ema.ema_weight(*args)

    monkeypatch.setattr(codebook, "ema_weight", counted)
    monkeypatch.setattr(vq_module, "ema_weight", counted)
    layer = make()
    layer(randn(2, 5, 6, seed=10), ema_update_weight=torch.ones(10))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------
# accum_ema_update, manual_ema_update


@pytest.mark.parametrize("masked", [False, True])
def test_accumulated_steps_equal_one_step_on_the_concatenated_batch(masked):
    layer = make(heads=2, codebook_dim=3)
    xs = [randn(2, 9, 6, seed=11 + i) for i in range(3)]
    gen = torch.Generator().manual_seed(14)
    keeps = [torch.rand(2, 9, generator=gen) > 0.3 if masked else None for _ in xs]
    before = state(layer)
    for x, keep in zip(xs[:2], keeps[:2]):
        layer(x, mask=keep, accum_ema_update=True)
        for key in ("embed", "embed_avg", "cluster_size"):  # nothing applied yet
            assert torch.equal(layer._codebook.state_dict()[key], before[f"_codebook.{key}"])
        assert layer._codebook.accum_cluster_size.dtype == torch.float32
    layer(xs[2], mask=keeps[2])
    total = torch.cat(xs)
    keep = None if not masked else torch.cat(keeps)
    check_ema(layer, *ema64(before, nearest_stats64(layer, before, total, keep), layer._codebook.decay,
                            layer._codebook.eps))
    assert set(layer.state_dict()) == set(before)  # applied: the accumulators are gone


def test_pending_accumulation_survives_a_checkpoint():
    layer = make(threshold_ema_dead_code=0.5)
    x1, x2 = randn(2, 9, 6, seed=15), randn(2, 9, 6, seed=16)
    layer(x1, accum_ema_update=True)
    saved = state(layer)
    assert {"_codebook.accum_cluster_size", "_codebook.accum_embed_sum"} <= set(saved)
    restored = make(seed=3, threshold_ema_dead_code=0.5)
    restored.load_state_dict(saved)  # strict
    layer(x2)
    restored(x2)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # and a state dict with nothing pending clears what was pending
    pending = make(threshold_ema_dead_code=0.5)
    pending(x1, accum_ema_update=True)
    pending.load_state_dict(layer.state_dict())
    assert pending._codebook.accum_cluster_size is None


def test_manual_ema_update_tracks_statistics_and_sets_codes_on_request():
    layer = make(manual_ema_update=True)
    before = state(layer)
    x = randn(2, 12, 6, seed=17)
    layer(x)
    cs, ea, embed = ema64(before, nearest_stats64(layer, before, x), layer._codebook.decay, layer._codebook.eps)
    close(layer._codebook.cluster_size, cs)
    close(layer._codebook.embed_avg, ea)
    assert torch.equal(layer._codebook.embed, before["_codebook.embed"])
    layer.update_ema()
    close(layer._codebook.embed, embed)


# ------------------------------------------------------------------------------------------
# update_indices, expire_codes_


@pytest.mark.parametrize("separate", [False, True])
def test_update_indices_uses_the_given_codes(separate):
    layer = make(heads=2, codebook_dim=3, separate_codebook_per_head=separate).eval()
    x = randn(3, 8, 6, seed=18)
    indices = torch.randint(0, 10, (3, 8, 2), generator=torch.Generator().manual_seed(19))
    indices[0, :3, 1] = -1  # counts nowhere
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[2, 5:] = False
    before = state(layer)
    layer.update_indices(x, indices, mask=keep)
    stats = []
    for g, (rows, kept) in enumerate(rows64(layer, x, keep)):
        idx = indices[..., g] if separate else indices
        kept = kept & (idx >= 0)
        stats.append(stats64(rows, kept, idx.clamp(min=0), 10))
    check_ema(layer, *ema64(before, stats, layer._codebook.decay, layer._codebook.eps))


def test_update_indices_takes_forwards_layouts():
    seq, image, one, first = make(), make(accept_image_fmap=True), make(), make()
    x = randn(2, 12, 6, seed=24)
    indices = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(24))
    seq.update_indices(x, indices)
    image.update_indices(x.transpose(1, 2).reshape(2, 6, 3, 4), indices.reshape(2, 3, 4))
    first.update_indices(x[:, :1], indices[:, :1])
    one.update_indices(x[:, 0], indices[:, 0])  # one token per item: (b, dim) and (b,)
    for a, b in ((seq, image), (first, one)):
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value), key
    assert not torch.equal(one._codebook.cluster_size, make()._codebook.cluster_size)


def test_expire_codes_replaces_dead_codes_by_rows_of_x():
    layer = make(threshold_ema_dead_code=1.0, reset_cluster_size=2.0)
    dead = torch.tensor([1, 4, 7])
    with torch.no_grad():
        layer._codebook.cluster_size.fill_(5.0)
        layer._codebook.cluster_size[0, dead] = 0.25
    x = randn(2, 5, 6, seed=20)
    layer.eval().expire_codes_(x)  # the peer's rule: nothing in eval
    before = state(layer)
    assert int(layer._codebook.dead_codes_replaced) == 0
    layer.train().expire_codes_(x)
    cb = layer._codebook
    live = torch.ones(10, dtype=torch.bool)
    live[dead] = False
    assert torch.equal(cb.embed[0, live], before["_codebook.embed"][0, live])
    rows = x.reshape(-1, 6)
    for j in dead.tolist():
        assert (rows - cb.embed[0, j]).abs().amax(-1).min() == 0, f"code {j} is not a row of x"
        assert cb.cluster_size[0, j] == 2.0
        close(cb.embed_avg[0, j], cb.embed[0, j] * 2.0)
    assert int(cb.dead_codes_replaced) == 3


# ------------------------------------------------------------------------------------------
# affine_param


def moments64(t):
    """(m, d) -> mean (d,), biased variance (d,)."""
    mean = t.mean(0)
    return mean, (t - mean).square().mean(0)


def mapped64(cb):
    """The searched codebook from the buffers, fp64 (h, k, d)."""
    cm, cv, bm, bv = (getattr(cb, n).to(F64) for n in ("codebook_mean", "codebook_variance", "batch_mean",
                                                        "batch_variance"))
    return (cb.embed.to(F64) - cm) * (bv.clamp(min=1e-5).sqrt() / cv.clamp(min=1e-5).sqrt()) + bm


def test_affine_moments_mapped_search_and_statistics():
    layer = make(affine_param=True, affine_param_batch_decay=0.7, affine_param_codebook_decay=0.6)
    cb = layer._codebook
    xs = [randn(2, 11, 6, seed=21 + i, scale=2.0) + 1.5 for i in range(2)]
    keeps = [None, torch.rand(2, 11, generator=torch.Generator().manual_seed(23)) > 0.3]
    expected = None
    for step, (x, keep) in enumerate(zip(xs, keeps)):
        before = state(layer)
        rows = x.to(F64).reshape(-1, 6)[keep.reshape(-1)] if keep is not None else x.to(F64).reshape(-1, 6)
        moments = (*moments64(before["_codebook.embed"][0].to(F64)), *moments64(rows))
        if expected is None:  # the first batch sets them
            expected = [m.reshape(1, 1, 6) for m in moments]
        else:
            decays = (0.6, 0.6, 0.7, 0.7)
            expected = [e * d + m.reshape(1, 1, 6) * (1 - d) for e, m, d in zip(expected, moments, decays)]
        _, indices, _ = layer(x, mask=keep)
        for name, value in zip(("codebook_mean", "codebook_variance", "batch_mean", "batch_variance"), expected):
            close(getattr(cb, name), value)
        # the search used the codebook mapped with the moments after this step's update
        cm, cv, bm, bv = expected
        searched = (before["_codebook.embed"].to(F64) - cm) * (bv.clamp(min=1e-5) / cv.clamp(min=1e-5)).sqrt() + bm
        z = x.to(F64)
        idx = nearest64(z, searched[0])
        kept = torch.ones(2, 11, dtype=torch.bool) if keep is None else keep
        assert torch.equal(indices[kept], idx[kept])
        # and the EMA statistics are those of the batch mapped back to the codebook's frame
        back = (z - bm[0]) * (cv.clamp(min=1e-5) / bv.clamp(min=1e-5)).sqrt()[0] + cm[0]
        check_ema(layer, *ema64(before, [stats64(back, kept, idx, 10)], cb.decay, cb.eps))
    # eval: the search and the lookup use the same mapped codebook (formula from the buffers)
    layer.eval()
    x = randn(2, 7, 6, seed=25, scale=2.0) + 1.5
    out, indices, _ = layer(x)
    assert torch.equal(indices, nearest64(x.to(F64), mapped64(cb)[0]))
    close(out, mapped64(cb)[0][indices], rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.get_output_from_indices(indices), out)


def test_affine_matches_vector_quantize_pytorch_in_training():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=6, codebook_size=10, affine_param=True, rotation_trick=False, decay=0.7)
    torch.manual_seed(0)
    peer = peer_module.VectorQuantize(**kwargs).train()
    ours = VectorQuantize(**kwargs).train()
    with torch.no_grad():
        for t in (peer, ours):
            t._codebook.embed.copy_(randn(1, 10, 6, seed=26))
            t._codebook.embed_avg.copy_(randn(1, 10, 6, seed=26))
    for step in range(3):
        x = randn(2, 16, 6, seed=27 + step, scale=1.5) + 0.5
        _, p_idx, _ = peer(x)
        _, o_idx, _ = ours(x)
        assert torch.equal(o_idx, p_idx.long())
        for key in ("embed", "embed_avg", "cluster_size", "batch_mean", "batch_variance", "codebook_mean",
                    "codebook_variance"):
            close(getattr(ours._codebook, key), getattr(peer._codebook, key), rtol=1e-5, atol=1e-5)


def test_weight_accumulation_indices_and_in_place_match_vector_quantize_pytorch():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=6, codebook_size=10, rotation_trick=False, decay=0.7)
    learnable = dict(learnable_codebook=True, ema_update=False,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.3))
    for extra in ({}, learnable):
        torch.manual_seed(0)
        peer = peer_module.VectorQuantize(**kwargs, **extra).train()
        ours = VectorQuantize(**kwargs, **extra).train()
        ours.load_state_dict(peer.state_dict())
        weight = torch.rand(10, generator=torch.Generator().manual_seed(44))
        calls = [dict(accum_ema_update=True), dict(ema_update_weight=weight), dict()]
        for step, call in enumerate(calls):
            x = randn(2, 16, 6, seed=45 + step)
            _, p_idx, _ = peer(x, **call)
            _, o_idx, _ = ours(x, **call)
            assert torch.equal(o_idx, p_idx.long())
        x, idx = randn(2, 16, 6, seed=48), torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(49))
        peer.update_indices(x, idx)
        ours.update_indices(x, idx)
        for key, value in ours.state_dict().items():
            close(value, peer.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_affine_buffers_stay_out_of_eval_and_empty_batches():
    layer = make(affine_param=True)
    before = state(layer)
    layer.eval()(randn(2, 5, 6, seed=30))
    layer.train()(randn(2, 5, 6, seed=30), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert_unchanged(before, layer)
    assert bool(layer._codebook.codebook_mean_needs_init)


# ------------------------------------------------------------------------------------------
# sync_update_v, in_place_codebook_optimizer


@pytest.mark.parametrize("rotation", [False, True])
def test_synchronized_update_gradient(rotation):
    v = 0.3
    grads = {}
    for nu in (0.0, v):
        torch.manual_seed(0)
        layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, commitment_weight=0.0,
                               rotation_trick=rotation, sync_update_v=nu).train()
        with torch.no_grad():
            layer._codebook.embed.copy_(randn(1, 10, 6, seed=31))
        x = randn(2, 8, 6, seed=32).requires_grad_(True)
        out, indices, _ = layer(x)
        g_out = randn(2, 8, 6, seed=33)
        (out * g_out).sum().backward()
        grads[nu] = (x.grad.clone(), layer._codebook.embed.grad, indices)
    x_grad, embed_grad, indices = grads[v]
    expected = torch.zeros(10, 6, dtype=F64).index_add_(0, indices.reshape(-1), g_out.to(F64).reshape(-1, 6)) * v
    close(embed_grad[0], expected)
    close(x_grad, grads[0.0][0], rtol=0, atol=0)  # the input's gradient is unchanged
    assert grads[0.0][1] is None or not grads[0.0][1].any()


@pytest.mark.parametrize("masked", [False, True])
def test_in_place_optimizer_takes_one_sgd_step_on_the_codebook_loss(masked):
    lr = 0.5
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True,
                           in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=lr)).train()
    embed = layer._codebook.embed
    with torch.no_grad():
        embed.copy_(randn(1, 10, 6, seed=34))
    user_grad = randn(1, 10, 6, seed=35)
    embed.grad = user_grad.clone()  # a gradient the user accumulated: left alone
    before = embed.detach().to(F64).clone()
    x = randn(2, 9, 6, seed=36)
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(37)) > 0.3 if masked else None
    kept = torch.ones(2, 9, dtype=torch.bool) if keep is None else keep
    z = x.to(F64)[kept]
    idx = nearest64(z, before[0])
    loss = (before[0][idx] - z).square().mean()
    grad = torch.zeros(10, 6, dtype=F64).index_add_(0, idx, 2 * (before[0][idx] - z) / z.numel())
    _, indices, _, breakdown = layer(x, mask=keep, return_loss_breakdown=True)
    close(embed[0], before[0] - lr * grad)
    close(breakdown.inplace_optimize, loss)
    assert torch.equal(embed.grad, user_grad)
    # the output's codes were searched in the moved codebook
    assert torch.equal(indices[kept], nearest64(z, before[0] - lr * grad))


def test_manual_in_place_optimizer_update_gathers_gradients_until_asked():
    lr = 0.5
    torch.manual_seed(0)
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, manual_in_place_optimizer_update=True,
                           in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=lr)).train()
    embed = layer._codebook.embed
    with torch.no_grad():
        embed.copy_(randn(1, 10, 6, seed=34))
    before = embed.detach().to(F64).clone()
    xs = [randn(2, 9, 6, seed=50 + i) for i in range(2)]
    grad = torch.zeros(10, 6, dtype=F64)
    for x in xs:
        z = x.to(F64).reshape(-1, 6)
        idx = nearest64(z, before[0])
        grad += torch.zeros(10, 6, dtype=F64).index_add_(0, idx, 2 * (before[0][idx] - z) / z.numel())
        held = embed.grad
        layer(x)
        assert held is None or embed.grad is held  # added in place (DDP's gradient_as_bucket_view views)
        assert torch.equal(embed.detach().to(F64), before)  # no step yet
    close(embed.grad[0], grad)
    layer.update_in_place_optimizer()
    close(embed[0], before[0] - lr * grad)
    assert embed.grad is None or not embed.grad.any()


# ------------------------------------------------------------------------------------------
# errors, NaN, dtypes, checkpoints


@pytest.mark.parametrize("kwargs,name", [
    (dict(affine_param=True, use_cosine_sim=True), "affine_param"),
    (dict(sync_affine_param=True), "sync_affine_param"),
    (dict(affine_param=True, affine_param_batch_decay=1.5), "affine_param_batch_decay"),
    (dict(affine_param=True, affine_param_codebook_decay=-0.1), "affine_param_codebook_decay"),
    (dict(sync_update_v=0.5), "sync_update_v"),
    (dict(sync_update_v=1.5, learnable_codebook=True), "sync_update_v"),
    (dict(in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), "in_place_codebook_optimizer"),
    (dict(in_place_codebook_optimizer="sgd", learnable_codebook=True), "in_place_codebook_optimizer"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        VectorQuantize(dim=6, codebook_size=8, **kwargs)


def test_update_indices_and_expire_codes_bad_input():
    layer = make(threshold_ema_dead_code=1.0)
    with pytest.raises(ValueError, match="indices"):
        layer.update_indices(randn(2, 5, 6), torch.full((2, 5), 10))
    with pytest.raises(ValueError, match="indices"):
        layer.update_indices(randn(2, 5, 6), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        layer.expire_codes_(randn(2, 5, 4))
    fresh = VectorQuantize(dim=6, codebook_size=10, kmeans_init=True)
    with pytest.raises(ValueError, match="update_indices"):
        fresh.update_indices(randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.long))


def test_empty_batches_change_nothing():
    layer = make(threshold_ema_dead_code=1.0, affine_param=True)
    before = state(layer)
    empty, no_indices = randn(0, 5, 6), torch.zeros(0, 5, dtype=torch.long)
    layer.update_indices(empty, no_indices)
    layer.expire_codes_(empty)
    layer(empty, accum_ema_update=True)
    assert not any("accum" in key for key in layer.state_dict())  # nothing pending: no new state
    out, indices, loss = layer(empty, ema_update_weight=torch.ones(10))
    assert out.shape == (0, 5, 6) and indices.shape == (0, 5) and loss == 0
    _, ce = layer(empty, indices=no_indices)
    assert ce == 0
    assert_unchanged(before, layer)


@pytest.mark.parametrize("manual", [False, True])
def test_empty_and_all_masked_batches_take_no_in_place_step(manual):
    """Adam with weight decay would move the codebook on a zero gradient (momentum, decay): an
    in-place step without a kept row anywhere must not run."""
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, in_place_codebook_optimizer=adam,
                           manual_in_place_optimizer_update=manual).train()
    layer(randn(2, 5, 6, seed=11))  # a real step: Adam has momentum now
    layer.update_in_place_optimizer()
    embed = layer._codebook.embed
    before = embed.detach().clone()
    optimizer = copy.deepcopy(layer.in_place_codebook_optimizer.state_dict())
    _, _, _, breakdown = layer(randn(2, 5, 6, seed=12), mask=torch.zeros(2, 5, dtype=torch.bool),
                               return_loss_breakdown=True)
    assert breakdown.inplace_optimize == 0
    layer(randn(0, 5, 6))
    assert torch.equal(embed.detach(), before)
    assert embed.grad is None or not embed.grad.any()
    after = layer.in_place_codebook_optimizer.state_dict()
    assert after["state"][0]["step"] == optimizer["state"][0]["step"]
    assert torch.equal(after["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])


NAN_CALLS = {
    "affine": (dict(affine_param=True), lambda layer, x: layer(x)),
    "accumulate": (dict(), lambda layer, x: layer(x, accum_ema_update=True)),
    "weight": (dict(), lambda layer, x: layer(x, ema_update_weight=torch.ones(10))),
    "in_place": (dict(learnable_codebook=True, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
                 lambda layer, x: layer(x)),
    "update_indices": (dict(), lambda layer, x: layer.update_indices(x, torch.zeros(2, 5, dtype=torch.long))),
    "expire_codes_": (dict(threshold_ema_dead_code=5.0), lambda layer, x: layer.expire_codes_(x)),
}


@pytest.mark.parametrize("name", list(NAN_CALLS))
def test_non_finite_input_raises_before_any_buffer_changes(name):
    kwargs, call = NAN_CALLS[name]
    layer = make(**kwargs)
    if name == "accumulate":
        layer(randn(2, 5, 6, seed=38), accum_ema_update=True)  # something pending
    x = randn(2, 5, 6, seed=39)
    x[1, 2, 3] = float("nan")
    before = state(layer)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        call(layer, x)
    assert_unchanged(before, layer)
    for k, v in layer.named_parameters():
        assert torch.equal(v, params[k]), k


DM_CONFIGS = {
    "affine": (dict(dim=8, codebook_size=16, heads=2, codebook_dim=3, separate_codebook_per_head=True,
                    affine_param=True), {}),
    "accumulate_weight": (dict(dim=8, codebook_size=16, heads=2, codebook_dim=4),
                          dict(ema_update_weight=lambda s, c: (c > 0).float())),  # after an accumulating call
    "manual_ema": (dict(dim=8, codebook_size=16, manual_ema_update=True, threshold_ema_dead_code=1.0), {}),
    "sync_update_in_place": (dict(dim=8, codebook_size=16, learnable_codebook=True, sync_update_v=0.5,
                                  in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), {}),
}


@pytest.mark.parametrize("cell", dtype_matrix(train=(True,)))
@pytest.mark.parametrize("name", list(DM_CONFIGS))
def test_dtype_matrix(name, cell):
    kwargs, forward_kwargs = DM_CONFIGS[name]

    def forward(layer, x):
        if name == "accumulate_weight":
            layer(x, accum_ema_update=True)
            assert layer._codebook.accum_embed_sum.dtype == torch.float32
        return layer(x, return_loss_breakdown=True, **forward_kwargs)

    res = run_cell(cell, lambda: VectorQuantize(**kwargs), lambda dt: randn(2, 10, 8, seed=40).to(dt), forward=forward)
    cb = res.layer._codebook
    for name_, buf in cb.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name_
    assert len(res.parts.losses) == 5


def test_state_dict_round_trip_with_the_new_buffers_under_half():
    layer = make(affine_param=True, threshold_ema_dead_code=0.5)
    layer(randn(2, 9, 6, seed=41))
    layer(randn(2, 9, 6, seed=42), accum_ema_update=True)
    layer = layer.half()
    for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance", "accum_cluster_size",
                 "accum_embed_sum"):
        assert getattr(layer._codebook, name).dtype == torch.float32, name
    saved = state(layer)
    restored = make(seed=5, affine_param=True, threshold_ema_dead_code=0.5).half()
    restored.load_state_dict(saved)
    for key, value in saved.items():
        assert torch.equal(restored.state_dict()[key], value), key
    x = randn(2, 9, 6, seed=43).half()
    assert torch.equal(layer(x)[1], restored(x)[1])
    for key, value in layer.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_compile_fullgraph_with_affine_and_ema_update_weight_matches_eager():
    torch.manual_seed(0)
    eager = VectorQuantize(dim=6, codebook_size=10, affine_param=True).train()
    compiled = VectorQuantize(dim=6, codebook_size=10, affine_param=True).train()
    compiled.load_state_dict(eager.state_dict())
    weight = torch.rand(10, generator=torch.Generator().manual_seed(61))
    step = torch.compile(lambda x, mask: compiled(x, mask=mask, ema_update_weight=weight), fullgraph=True)
    for i in range(2):
        x = randn(2, 8, 6, seed=62 + i)
        mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(64 + i)) > 0.2
        assert torch.equal(step(x, mask)[1], eager(x, mask=mask, ema_update_weight=weight)[1])
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 2 ranks on half batches == 1 process on the whole batch


def _rank_batch(step, rank):
    return randn(2, 7, 6, seed=100 + 10 * step + rank, scale=1.5) + 0.5


def _gathered_equal(t):
    parts = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _dist_worker(rank, world):
    configs = [
        (dict(dim=6, codebook_size=10, affine_param=True, sync_affine_param=True), [False, False]),
        (dict(dim=6, codebook_size=10, affine_param=True), [False]),  # synced by default
        (dict(dim=6, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=True), [True, True, False]),
        (dict(dim=6, codebook_size=10, learnable_codebook=True,
              in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)), [False, False]),
    ]
    for kwargs, accumulate in configs:
        torch.manual_seed(0)
        layer = VectorQuantize(**kwargs).train()
        single = VectorQuantize(**kwargs, sync_codebook=False).train()
        single.load_state_dict(layer.state_dict())
        for step, acc in enumerate(accumulate):
            xs = [_rank_batch(step, r) for r in range(world)]
            keep = torch.ones(2, 7, dtype=torch.bool)
            keep[1, 4 + rank:] = False  # uneven kept counts across the ranks
            keeps = [torch.ones(2, 7, dtype=torch.bool) for _ in range(world)]
            for r in range(world):
                keeps[r][1, 4 + r:] = False
            out = layer(xs[rank], mask=keep, accum_ema_update=acc, return_loss_breakdown=True)
            ref = single(torch.cat(xs), mask=torch.cat(keeps), accum_ema_update=acc, return_loss_breakdown=True)
            torch.testing.assert_close(out[3].inplace_optimize, ref[3].inplace_optimize, rtol=1e-5, atol=1e-6)
        # given indices: the statistics of the global batch too
        gen = torch.Generator().manual_seed(60)
        idx = [torch.randint(0, 10, (2, 7, layer.heads), generator=gen).squeeze(-1) for _ in range(world)]
        xs = [_rank_batch(9, r) for r in range(world)]
        layer.update_indices(xs[rank], idx[rank])
        single.update_indices(torch.cat(xs), torch.cat(idx))
        for key, value in layer.state_dict().items():
            assert _gathered_equal(value), f"{key} differs across ranks"
            torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-5, atol=1e-5)
        for key, value in layer.named_parameters():
            torch.testing.assert_close(value, dict(single.named_parameters())[key], rtol=1e-5, atol=1e-6)
    # expire_codes_ before any synced step, on ranks built from different seeds with different
    # dead codes: the first rank's state is taken first (as a training step does), then rows drawn
    torch.manual_seed(rank)
    layer = VectorQuantize(dim=6, codebook_size=10, threshold_ema_dead_code=1.0).train()
    with torch.no_grad():
        layer._codebook.cluster_size.fill_(5.0)[0, rank] = 0.0
    alive = layer._codebook.embed.detach().clone()
    dist.broadcast(alive, 0)
    layer.expire_codes_(_rank_batch(0, rank))
    for key, value in layer.state_dict().items():
        assert _gathered_equal(value), f"expire_codes_: {key} differs across ranks"
    assert int(layer._codebook.dead_codes_replaced) == 1
    assert torch.equal(layer._codebook.embed[0, 1:], alive[0, 1:])  # rank 0's live codes kept


@pytest.mark.timeout(120)
def test_distributed_accumulation_affine_and_in_place_equal_one_process():
    run_in_processes(_dist_worker, 2, timeout=100)


@pytest.mark.parametrize("make", ["vq", "vq_affine_kmeans", "latent"])
def test_an_optimizer_eps_that_rounds_to_zero_in_fp16_is_refused_before_anything_changes(make):
    """fp16 codebook + Adam: eps = 1e-8 rounds to 0 in fp16, so a code with a zero gradient would
    take 0/0 = NaN. Refused before the step changes anything (affine moments, k-means init, codes,
    optimizer state); an eps fp16 can hold steps, and bf16 (fp32's exponent range) steps fine."""
    from vq_layers import LatentQuantize

    def build(dtype, eps=1e-8):
        torch.manual_seed(0)
        adam = lambda params: torch.optim.Adam(params, lr=0.1, eps=eps)  # noqa: E731
        if make.startswith("vq"):
            extra = dict(affine_param=True, kmeans_init=True) if make == "vq_affine_kmeans" else {}
            layer = VectorQuantize(dim=8, codebook_size=32, learnable_codebook=True, ema_update=False,
                                   in_place_codebook_optimizer=adam, **extra)
            return layer.to(dtype).train(), randn(2, 20, 8, seed=3).to(dtype)
        layer = LatentQuantize(levels=[5, 5, 8], dim=8, in_place_codebook_optimizer=adam)
        return layer.to(dtype).train(), randn(2, 8, 10, seed=3).to(dtype)

    layer, x = build(torch.float16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="in_place_codebook_optimizer: its eps=1e-08 rounds to 0 in the float16"):
        layer(x)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert layer.in_place_codebook_optimizer.state_dict()["state"] == {}
    for dtype, eps in ((torch.float16, 1e-4), (torch.bfloat16, 1e-8)):
        layer, x = build(dtype, eps)
        for _ in range(2):
            layer(x)
        assert all(torch.isfinite(p).all() for p in layer.parameters())
        assert layer.in_place_codebook_optimizer.state_dict()["state"] != {}


def test_an_in_place_step_that_raises_leaves_the_users_grad():
    """LBFGS needs a closure: its step raises, and the user's accumulated .grad is as it was."""
    layer = VectorQuantize(dim=6, codebook_size=10, learnable_codebook=True, ema_update=False,
                           in_place_codebook_optimizer=lambda p: torch.optim.LBFGS(p)).train()
    embed = layer._codebook.embed
    embed.grad = torch.full_like(embed, 7.0)
    with pytest.raises(TypeError):
        layer(randn(2, 5, 6, seed=1))
    assert torch.equal(embed.grad, torch.full_like(embed, 7.0))


def test_a_peer_affine_checkpoint_saved_before_training_loads():
    """The peer registers batch_mean/batch_variance at its first training step: an untrained
    checkpoint lacks them and loads as the identity map (means 0, variances 1); a trained one
    loads as it is."""
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    peer = peer_module.VectorQuantize(dim=6, codebook_size=10, affine_param=True)
    ours = VectorQuantize(dim=6, codebook_size=10, affine_param=True)
    ours._codebook.batch_mean.fill_(3.0)
    ours.load_state_dict(peer.state_dict())
    assert torch.equal(ours._codebook.batch_mean, torch.zeros(1, 1, 6))
    assert torch.equal(ours._codebook.batch_variance, torch.ones(1, 1, 6))
    peer.train()(randn(2, 5, 6, seed=1))
    ours.load_state_dict(peer.state_dict())
    assert torch.equal(ours._codebook.batch_mean, peer._codebook.batch_mean)
    # only an untrained peer checkpoint is filled: a partial or cut one is not
    ours.load_state_dict({"_codebook.codebook_mean": torch.zeros(1, 1, 6)}, strict=False)
    assert torch.equal(ours._codebook.batch_mean, peer._codebook.batch_mean)
    cut = {k: v for k, v in ours.state_dict().items() if "batch_" not in k}
    with pytest.raises(RuntimeError, match="batch_mean"):
        ours.load_state_dict(cut)


def test_update_ema_indices_is_the_peers_older_name():
    layer, twin = make(), make()
    twin.load_state_dict(layer.state_dict())
    x = randn(2, 5, 6, seed=2)
    indices = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    layer.update_ema_indices(x, indices)
    twin.update_indices(x, indices)
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), twin.state_dict().values()))
    assert not torch.equal(layer._codebook.embed, make()._codebook.embed)  # it did update
