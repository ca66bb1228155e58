"""The numerics VectorQuantize shares, each against an independent fp64 reference.

- ema.py: `code_statistics`, `ema_update_`, `normalized_codebook` against the one-hot formulas
  of VQ-VAE's EMA update (arXiv 1711.00937, appendix): counts = onehot.sum(rows),
  sums = onehot^T x, cluster_size <- lerp(cluster_size, counts, 1 - decay) (same for the sums),
  Laplace smoothing (cs + eps) / (total + K eps) * total, codebook = embed_avg / smoothed;
- kmeans.py: `kmeans` lowers the quantization error of its own random init on clustered data,
  ends at a Lloyd fixed point (every mean is the mean of its fp64 brute-force cluster), and an
  empty cluster keeps its previous mean;
- rotation_trick.py: value q exactly, input gradient lambda R^T g with R built as an explicit
  d x d matrix (Fifty et al. 2024, arXiv 2410.06424, section 4.2);
- kernels/code_softmax.py: values and gradients equal a dense fp64 softmax over
  -||x - c|| * scale (Euclidean, not squared) or x . c * scale, with tiles forced small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vq_layers.kernels.code_softmax as cs_mod
import vq_layers.kernels.nearest_code as nc
from reference import close, randn, rotation_vjp64
from vq_layers.ema import code_statistics, ema_update_, normalized_codebook
from vq_layers.kernels.code_softmax import code_cross_entropy, code_probs_sum, soft_codes
from vq_layers.kmeans import kmeans, sample_rows
from vq_layers.rotation_trick import rotation_trick

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def onehot64(indices, k):
    """(h, n) int -> (h, n, k) fp64 one-hot; negative indices give a zero row."""
    valid = indices >= 0
    return F.one_hot(indices.clamp(min=0), k).to(F64) * valid.unsqueeze(-1).to(F64)


def smoothed64(cluster_size, eps):
    cs = cluster_size.to(F64)
    k = cs.shape[-1]
    total = cs.sum(-1, keepdim=True)
    return (cs + eps) / (total + k * eps) * total


# ------------------------------------------------------------------------------------------
# ema.py


@pytest.mark.parametrize("h", [1, 3])
@pytest.mark.parametrize("with_keep", [False, True])
def test_code_statistics_equal_one_hot_formula(h, with_keep):
    n, d, k = 50, 5, 7
    x = randn(h, n, d, seed=1, scale=2.0)
    g = torch.Generator().manual_seed(2)
    indices = torch.randint(0, k, (h, n), generator=g)
    keep = torch.rand(h, n, generator=g) > 0.3 if with_keep else None
    if keep is not None:
        x[~keep] = float("nan")  # masked rows count nowhere, NaN included
        x[~keep & (torch.arange(n) % 2 == 0)] = float("inf")
    counts, sums = code_statistics(x, indices, k, keep)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert counts.shape == (h, k) and sums.shape == (h, k, d)

    onehot = onehot64(indices if keep is None else indices.masked_fill(~keep, -1), k)  # (h, n, k)
    x64 = x.to(F64) if keep is None else torch.where(keep.unsqueeze(-1), x.to(F64), 0.0)
    ref_counts = onehot.sum(1)
    ref_sums = torch.einsum("hnk,hnd->hkd", onehot, x64)
    assert torch.isfinite(sums).all()
    close(counts, ref_counts, rtol=0, atol=0)
    close(sums, ref_sums)


def test_code_statistics_all_masked_is_zero():
    x = torch.full((2, 6, 3), float("nan"))
    indices = torch.zeros(2, 6, dtype=torch.long)
    counts, sums = code_statistics(x, indices, 4, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(counts, torch.zeros(2, 4)) and torch.equal(sums, torch.zeros(2, 4, 3))


@pytest.mark.parametrize("decay", [0.0, 0.8, 0.99, 1.0])
def test_ema_update_is_a_lerp_of_the_batch_statistics(decay):
    h, k, d = 2, 6, 4
    cluster_size = randn(h, k, seed=3).abs() + 0.5
    embed_avg = randn(h, k, d, seed=4)
    counts = torch.randint(0, 5, (h, k), generator=torch.Generator().manual_seed(5)).float()
    sums = randn(h, k, d, seed=6)
    cs0, ea0 = cluster_size.clone(), embed_avg.clone()
    ema_update_(cluster_size, embed_avg, counts, sums, decay)
    close(cluster_size, cs0.to(F64) * decay + counts.to(F64) * (1 - decay))
    close(embed_avg, ea0.to(F64) * decay + sums.to(F64) * (1 - decay))


def test_ema_update_with_an_empty_batch_leaves_statistics_unchanged():
    h, k, d = 2, 5, 3
    x = randn(h, 8, d, seed=7)
    indices = torch.randint(0, k, (h, 8), generator=torch.Generator().manual_seed(8))
    keep = torch.ones(h, 8, dtype=torch.bool)
    keep[1] = False  # codebook 1 saw nothing
    counts, sums = code_statistics(x, indices, k, keep)
    cluster_size, embed_avg = randn(h, k, seed=9).abs() + 1, randn(h, k, d, seed=10)
    cs0, ea0 = cluster_size.clone(), embed_avg.clone()
    ema_update_(cluster_size, embed_avg, counts, sums, 0.8)
    assert torch.equal(cluster_size[1], cs0[1]) and torch.equal(embed_avg[1], ea0[1])
    # codebook 0 did move, by the formula
    onehot = onehot64(indices[0], k)
    close(cluster_size[0], cs0[0].to(F64) * 0.8 + onehot.sum(0) * 0.2)
    close(embed_avg[0], ea0[0].to(F64) * 0.8 + (onehot.t() @ x[0].to(F64)) * 0.2)

    # a batch with no rows at all (n = 0)
    counts, sums = code_statistics(x[:, :0], indices[:, :0], k)
    cs1, ea1 = cluster_size.clone(), embed_avg.clone()
    ema_update_(cluster_size, embed_avg, counts, sums, 0.8)
    assert torch.equal(cluster_size, cs1) and torch.equal(embed_avg, ea1)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_normalized_codebook_is_laplace_smoothed_mean(cosine, eps):
    h, k, d = 2, 6, 4
    cluster_size = randn(h, k, seed=11).abs() * 3
    cluster_size[0, 2] = 0.0  # a code nobody chose: smoothing keeps it finite
    embed_avg = randn(h, k, d, seed=12)
    got = normalized_codebook(cluster_size, embed_avg, eps, cosine)
    ref = embed_avg.to(F64) / smoothed64(cluster_size, eps).unsqueeze(-1)
    if cosine:
        ref = ref / ref.norm(dim=-1, keepdim=True)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    close(got, ref)


def test_normalized_codebook_smoothing_keeps_the_total_count():
    # (cs + eps) / (total + K eps) * total: with eps large the difference from cs / 1 is visible
    cluster_size = torch.tensor([[4.0, 0.0, 1.0, 5.0]])
    embed_avg = torch.ones(1, 4, 2)
    got = normalized_codebook(cluster_size, embed_avg, 1.0, False)
    total = 10.0
    smoothed = (torch.tensor([4.0, 0.0, 1.0, 5.0]) + 1.0) / (total + 4.0) * total
    close(got[0], (1.0 / smoothed).unsqueeze(-1).expand(4, 2))


# ------------------------------------------------------------------------------------------
# kmeans.py


def clustered(n_per, centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    pts = [c + noise * torch.randn(n_per, centers.shape[1], generator=g) for c in centers]
    return torch.cat(pts)[torch.randperm(n_per * len(centers), generator=g)]


def quant_error64(x, means):
    d = torch.cdist(x.to(F64), means.to(F64)).square()
    return d.min(-1).values.mean().item()


def run_kmeans(samples, k, iters, seed, metric="l2"):
    """samples: per codebook (n_h, d) -> (means, counts), or None when a codebook has no rows
    (k-means takes them padded to one length, with a keep mask)."""
    longest = max(s.shape[0] for s in samples)
    x = torch.stack([torch.cat([s, s.new_full((longest - s.shape[0], s.shape[1]), float("nan"))]) for s in samples])
    keep = torch.stack([torch.arange(longest) < s.shape[0] for s in samples])
    rows, valid = sample_rows(x, keep, k, torch.tensor(seed))
    means, counts, found = kmeans(x, keep, rows, valid, iters, metric)
    return (means, counts) if bool(found.all()) else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_lowers_error_of_its_random_init_and_is_a_lloyd_fixed_point(seed):
    centers = randn(6, 4, seed=20, scale=5.0)
    x = clustered(30, centers, 0.3, seed=21 + seed)
    init, _ = run_kmeans([x], 6, 0, seed)  # iters=0: the random draw k-means starts from
    means, counts = run_kmeans([x], 6, 20, seed)
    assert means.shape == (1, 6, 4) and counts.shape == (1, 6)
    # the same draw
    e0, e1 = quant_error64(x, init[0]), quant_error64(x, means[0])
    assert e1 <= e0 * (1 + 1e-6)  # Lloyd iterations never increase the error
    # Lloyd fixed point against an fp64 brute-force assignment
    assign = torch.cdist(x.to(F64), means[0].to(F64)).argmin(-1)
    ref_counts = torch.bincount(assign, minlength=6).to(F64)
    close(counts[0], ref_counts, rtol=0, atol=0)
    for j in range(6):
        if ref_counts[j] > 0:
            close(means[0, j], x[assign == j].to(F64).mean(0), rtol=1e-5, atol=1e-5)
    assert counts.sum() == x.shape[0]


def test_kmeans_beats_random_init_on_average():
    centers = randn(8, 3, seed=30, scale=4.0)
    wins = 0
    for seed in range(6):
        x = clustered(25, centers, 0.2, seed=31 + seed)
        init, _ = run_kmeans([x], 8, 0, seed)
        means, _ = run_kmeans([x], 8, 10, seed)
        wins += quant_error64(x, means[0]) < quant_error64(x, init[0]) - 1e-6
    assert wins >= 4


def test_kmeans_empty_clusters_stay_put():
    # 4 distinct points, each repeated: 6 means drawn from them must repeat, and a repeated
    # mean loses every tie (lowest index wins), so its cluster is empty and it must not move
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = points.repeat(10, 1)
    all_points_drawn = 0
    for seed in range(6):
        init, _ = run_kmeans([x], 6, 0, seed)
        means, counts = run_kmeans([x], 6, 4, seed)
        assert torch.isfinite(means).all()
        empty = counts[0] == 0
        assert empty.sum() >= 2  # pigeonhole
        assert torch.equal(means[0][empty], init[0][empty])
        if all((init[0] == p).all(-1).any() for p in points):  # then every point keeps its own mean:
            all_points_drawn += 1  # non-empty clusters sit exactly on their point
            for j in (~empty).nonzero().squeeze(-1).tolist():
                assert (means[0, j] == points).all(-1).any()
    assert all_points_drawn >= 1


def test_kmeans_per_codebook_and_spherical():
    a = clustered(20, randn(3, 4, seed=40, scale=4.0), 0.2, seed=41)
    b = clustered(15, randn(3, 4, seed=42, scale=4.0), 0.2, seed=43)
    means, counts = run_kmeans([a, b], 3, 10, 0)
    assert means.shape == (2, 3, 4)
    assert counts[0].sum() == a.shape[0] and counts[1].sum() == b.shape[0]
    sa, sb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    means, _ = run_kmeans([sa, sb], 3, 10, 0, metric="dot")
    close(means.norm(dim=-1), torch.ones(2, 3, dtype=F64))


def test_kmeans_without_samples_returns_none():
    assert run_kmeans([torch.zeros(0, 3)], 4, 3, 0) is None


# ------------------------------------------------------------------------------------------
# rotation_trick.py




@pytest.mark.parametrize("d", [2, 5, 16])
def test_rotation_trick_value_and_gradient(d):
    x = randn(20, d, seed=50).requires_grad_(True)
    q = randn(20, d, seed=51, scale=2.0)
    g = randn(20, d, seed=52)
    out = rotation_trick(x, q)
    assert torch.equal(out, q)  # the value is the code itself, bit for bit
    (grad,) = torch.autograd.grad(out, x, g)
    ref = rotation_vjp64(x.detach(), q, g)
    close(grad, ref, rtol=1e-5, atol=1e-5)
    # not the plain straight-through gradient
    assert (grad - g).abs().max() > 1e-2


def test_rotation_trick_batched_shape_and_no_gradient_to_q():
    x = randn(2, 3, 6, seed=53).requires_grad_(True)
    q = randn(2, 3, 6, seed=54).requires_grad_(True)
    g = randn(2, 3, 6, seed=55)
    out = rotation_trick(x, q)
    assert torch.equal(out, q.detach())
    gx, gq = torch.autograd.grad(out, (x, q), g, allow_unused=True)
    assert gq is None or torch.count_nonzero(gq) == 0
    ref = rotation_vjp64(x.detach().reshape(-1, 6), q.detach().reshape(-1, 6), g.reshape(-1, 6))
    close(gx.reshape(-1, 6), ref, rtol=1e-5, atol=1e-5)


def test_rotation_trick_same_direction_scales_only():
    # q = 3 x: R = I, lambda = 3 -> gradient 3 g
    x = randn(4, 5, seed=56).requires_grad_(True)
    q = 3 * x.detach()
    g = randn(4, 5, seed=57)
    (grad,) = torch.autograd.grad(rotation_trick(x, q), x, g)
    close(grad, 3 * g.to(F64), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# kernels/code_softmax.py


def logits64(x, codebook, metric, scale):
    x, codebook = x.to(F64), codebook.to(F64)
    if metric == "dot":
        return torch.einsum("hnd,hkd->hnk", x, codebook) * scale
    diff = x.unsqueeze(2) - codebook.unsqueeze(1)  # (h, n, k, d)
    return -diff.square().sum(-1).sqrt() * scale  # Euclidean distance, not squared


def ref_probs_sum(x, codebook, metric, scale, weight=None):
    p = logits64(x, codebook, metric, scale).softmax(-1)
    w = torch.ones(p.shape[:2], dtype=F64) if weight is None else weight.to(F64)
    return (p * w.unsqueeze(-1)).sum(1)


def ref_cross_entropy(x, codebook, targets, metric, scale):
    logp = logits64(x, codebook, metric, scale).log_softmax(-1)
    valid = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid).sum() / valid.sum().clamp(min=1)


def ref_soft_codes(x, codebook, metric, scale):
    p = logits64(x, codebook, metric, scale).softmax(-1)
    return torch.einsum("hnk,hkd->hnd", p, codebook.to(F64))


@pytest.fixture(params=[False, True], ids=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(nc, "TILE_ELEMENTS", 16)
    return request.param


def inputs(h, n, k, d, metric, seed):
    x = randn(h, n, d, seed=seed)
    c = randn(h, k, d, seed=seed + 1)
    if metric == "dot":
        x, c = F.normalize(x, dim=-1), F.normalize(c, dim=-1)
    return x.requires_grad_(True), c.requires_grad_(True)


def grads_against(fn_ours, fn_ref, x, c, seed):
    out = fn_ours(x, c)
    g = randn(*out.shape, seed=seed)
    gx, gc = torch.autograd.grad(out, (x, c), g)
    x64 = x.detach().to(F64).requires_grad_(True)
    c64 = c.detach().to(F64).requires_grad_(True)
    ref = fn_ref(x64, c64)
    rx, rc = torch.autograd.grad(ref, (x64, c64), g.to(F64))
    return out, ref, (gx, rx), (gc, rc)


CASES = [("l2", 1.0), ("l2", 3.0), ("dot", 1.0), ("dot", 10.0)]


@pytest.mark.parametrize("metric,scale", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_code_probs_sum(tiles, metric, scale, weighted):
    h, n, k, d = 2, 13, 5, 4
    if tiles:
        assert len(cs_mod._tiles(torch.zeros(h, n, d), k)) > 2  # several row tiles really run
    x, c = inputs(h, n, k, d, metric, seed=60)
    weight = (torch.rand(h, n, generator=torch.Generator().manual_seed(61)) > 0.3) if weighted else None
    out, ref, (gx, rx), (gc, rc) = grads_against(
        lambda a, b: code_probs_sum(a, b, metric, scale, weight),
        lambda a, b: ref_probs_sum(a, b, metric, scale, weight), x, c, seed=62)
    assert out.dtype == torch.float32 and out.shape == (h, k)
    close(out, ref, rtol=1e-5, atol=1e-5)
    close(gx, rx, rtol=1e-4, atol=1e-5)
    close(gc, rc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric,scale", CASES)
@pytest.mark.parametrize("ignored", [False, True])
def test_code_cross_entropy(tiles, metric, scale, ignored):
    h, n, k, d = 2, 11, 6, 3
    x, c = inputs(h, n, k, d, metric, seed=70)
    targets = torch.randint(0, k, (h, n), generator=torch.Generator().manual_seed(71))
    if ignored:
        targets[0, ::3] = -1
        targets[1, :4] = -1
    out = code_cross_entropy(x, c, targets, metric, scale)
    assert out.dtype == torch.float32 and out.ndim == 0
    x64 = x.detach().to(F64).requires_grad_(True)
    c64 = c.detach().to(F64).requires_grad_(True)
    ref = ref_cross_entropy(x64, c64, targets, metric, scale)
    close(out, ref, rtol=1e-5, atol=1e-6)
    gx, gc = torch.autograd.grad(out, (x, c))
    rx, rc = torch.autograd.grad(ref, (x64, c64))
    close(gx, rx, rtol=1e-4, atol=1e-6)
    close(gc, rc, rtol=1e-4, atol=1e-6)
    if ignored:  # an ignored row gets no gradient
        assert torch.count_nonzero(gx[0, ::3]) == 0


def test_code_cross_entropy_all_ignored_is_zero(tiles):
    x, c = inputs(1, 5, 4, 3, "l2", seed=72)
    out = code_cross_entropy(x, c, torch.full((1, 5), -1), "l2")
    assert out.item() == 0.0 and torch.isfinite(out)


@pytest.mark.parametrize("metric,scale", CASES)
def test_soft_codes(tiles, metric, scale):
    h, n, k, d = 2, 9, 7, 4
    x, c = inputs(h, n, k, d, metric, seed=80)
    out, ref, (gx, rx), (gc, rc) = grads_against(
        lambda a, b: soft_codes(a, b, metric, scale),
        lambda a, b: ref_soft_codes(a, b, metric, scale), x, c, seed=81)
    assert out.shape == (h, n, d) and out.dtype == torch.float32
    close(out, ref, rtol=1e-5, atol=1e-5)
    close(gx, rx, rtol=1e-4, atol=1e-5)
    close(gc, rc, rtol=1e-4, atol=1e-5)


def test_code_softmax_under_bf16_autocast_stays_fp32(tiles):
    x, c = inputs(1, 8, 5, 4, "l2", seed=90)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = code_probs_sum(x, c, "l2", 2.0)
        ce = code_cross_entropy(x, c, torch.zeros(1, 8, dtype=torch.long), "l2", 2.0)
    assert out.dtype == torch.float32 and ce.dtype == torch.float32
    close(out, ref_probs_sum(x.detach(), c.detach(), "l2", 2.0), rtol=1e-5, atol=1e-5)
