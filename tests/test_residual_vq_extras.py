"""ResidualVQ extras: per-stage codebook sizes, quant_grad_frac, implicit neural codebooks
(QINCo) and beam search, against independent references (fp64 exhaustive search over all
paths, fp64 greedy, the gradient formula, the peer where it is right)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_in_processes
from dtype_matrix import Parts, dtype_matrix, run_cell
from reference import randn
from vq_layers import GroupedResidualVQ, ResidualVQ
from vq_layers.layers.beam_search import beam_search

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def path_score64(x, codebooks, path, weights):
    """fp64 score of paths: sum_k w_k mean_d (r_{k+1})^2. x (m, d), path (m, q) -> (m,)."""
    residual, score = x.to(F64), torch.zeros(x.shape[0], dtype=F64)
    for k, w in enumerate(weights):
        residual = residual - codebooks[k].to(F64)[path[:, k]]
        score = score + w * residual.square().mean(-1)
    return score


def greedy64(x, codebooks):
    residual, path = x.to(F64), []
    for codebook in codebooks:
        idx = (residual[:, None] - codebook.to(F64)).square().sum(-1).argmin(-1)
        path.append(idx)
        residual = residual - codebook.to(F64)[idx]
    return torch.stack(path, -1)


def codebooks_of(rvq):
    return [layer.codebook.detach() for layer in rvq.layers]


# ------------------------------------------------------------------------------------------
# codebook sizes per stage


def test_codebook_size_tuple_matches_the_peer():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kw = dict(dim=6, codebook_size=(8, 16, 4), codebook_dim=3, rotation_trick=False)
    ours, peer = ResidualVQ(**kw).eval(), vqp.ResidualVQ(**kw).eval()
    assert ours.num_quantizers == 3 and [layer.codebook_size for layer in ours.layers] == [8, 16, 4]
    assert set(ours.state_dict()) == set(peer.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 7, 6, seed=1)
    (o, oi, _), (p, pi, _) = ours(x), peer(x)
    assert torch.equal(oi, pi.long())
    torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-6)
    assert isinstance(ours.codebooks, tuple) and [c.shape[0] for c in ours.codebooks] == [8, 16, 4]
    assert torch.equal(ours.get_output_from_indices(oi), o)
    assert torch.equal(greedy64(ours.project_in(x).reshape(-1, 3).detach(), codebooks_of(ours)), oi.reshape(-1, 3))


def test_codebook_size_errors():
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="codebook_size: expected one size per quantizer"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=(8, 8, 8))
    with pytest.raises(ValueError, match="shared_codebook"):
        ResidualVQ(dim=4, codebook_size=(8, 4), shared_codebook=True)
    rvq = ResidualVQ(dim=4, codebook_size=(8, 4))
    with pytest.raises(ValueError, match=r"indices\[..., 1\]"):  # 5 is in range for stage 0, not stage 1
        rvq.get_output_from_indices(torch.tensor([[[5, 5]]]))
    with pytest.raises(ValueError, match=r"indices\[..., 1\]"):
        rvq(randn(1, 1, 4), indices=torch.tensor([[[5, 5]]]))


# ------------------------------------------------------------------------------------------
# quant_grad_frac


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_quant_grad_frac_gradient_formula(frac):
    """Straight-through stages, no losses: d sum(out)/dx = sum_k (1 - frac)^k, and the values do
    not depend on frac (bitwise)."""
    kw = dict(dim=4, num_quantizers=3, codebook_size=8, rotation_trick=False, commitment_weight=0.0)
    torch.manual_seed(0)
    rvq = ResidualVQ(quant_grad_frac=frac, **kw).train()
    torch.manual_seed(0)
    plain = ResidualVQ(**kw).eval()
    x = randn(2, 5, 4, seed=2).requires_grad_()
    out, indices, _ = rvq(x)
    g = randn(2, 5, 4, seed=3)
    out.backward(g)
    expected = sum((1 - frac) ** k for k in range(3))
    torch.testing.assert_close(x.grad, g * expected)
    ref_out, ref_indices, _ = plain(x.detach())
    assert torch.equal(out.detach(), ref_out) and torch.equal(indices, ref_indices)
    with pytest.raises(ValueError, match="quant_grad_frac"):
        ResidualVQ(quant_grad_frac=-0.5, **kw)


# ------------------------------------------------------------------------------------------
# implicit neural codebooks (QINCo)


def test_implicit_neural_codebook_matches_the_peer():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kw = dict(dim=4, num_quantizers=3, codebook_size=8, implicit_neural_codebook=True,
              mlp_kwargs=dict(depth=2, dim_hidden=6))
    torch.manual_seed(0)
    ours = ResidualVQ(**kw).eval()
    peer = vqp.ResidualVQ(**kw).eval()
    assert set(ours.state_dict()) == set(peer.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 6, 4, seed=4)
    (o, oi, _), (p, pi, _) = ours(x), peer(x)
    assert torch.equal(oi, pi.long())
    torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5)
    # decoding transforms one code per token: the forward's output up to rounding
    torch.testing.assert_close(ours.get_output_from_indices(oi), o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.get_codes_from_indices(oi), peer.get_codes_from_indices(pi), rtol=1e-5, atol=1e-5)


def test_implicit_neural_codebook_search_equals_fp64_and_networks_learn():
    """Stage 1 picks the fp64-nearest of the per-token codebook mlp(codebook | stage 0's code);
    the commitment loss trains the networks."""
    torch.manual_seed(1)
    rvq = ResidualVQ(dim=3, num_quantizers=2, codebook_size=6, implicit_neural_codebook=True,
                     mlp_kwargs=dict(depth=1)).train()
    x = randn(3, 4, 3, seed=5)
    _, indices, losses = rvq(x)
    mlp = copy.deepcopy(rvq.mlps[0]).double()
    c0, c1 = (layer.codebook.detach().to(F64) for layer in rvq.layers)
    first = c0[indices[..., 0]]  # (b, n, d)
    per_token = mlp(c1, condition=first)  # (b, n, c, d) fp64
    d2 = ((x.to(F64) - first)[..., None, :] - per_token).square().sum(-1)
    assert torch.equal(indices[..., 1], d2.argmin(-1))
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rvq.mlps[0].parameters())


def test_implicit_neural_codebook_state_dict_round_trip():
    kw = dict(dim=4, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True)
    a, b = ResidualVQ(**kw).eval(), ResidualVQ(**kw).eval()
    b.load_state_dict(a.state_dict())
    x = randn(2, 5, 4, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    with pytest.raises(ValueError, match="implicit_neural_codebook"):
        a(x, indices=torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="depth"):
        ResidualVQ(mlp_kwargs=dict(depth=-1), **kw)


# ------------------------------------------------------------------------------------------
# beam search


def layer_path(rvq, x, beam):
    """The layer's chosen path in eval, with projections off."""
    return rvq.eval()(x[None], beam_size=beam)[1][0]


@pytest.mark.parametrize("weights", [None, [0.0, 0.0, 1.0]])
def test_beam_search_wide_enough_is_the_exhaustive_optimum(weights):
    """K = 4, q = 3: beam_size >= K^(q-1) = 16 returns the best of all 64 paths (fp64 scores)."""
    torch.manual_seed(2)
    rvq = ResidualVQ(dim=2, num_quantizers=3, codebook_size=4, beam_size=16, beam_score_quantizer_weights=weights)
    x = randn(60, 2, seed=7)
    path = layer_path(rvq, x, 16)
    w = weights or [1.0, 1.0, 1.0]
    all_paths = torch.tensor(list(itertools.product(range(4), repeat=3)))  # (64, 3)
    scores = torch.stack([path_score64(x, codebooks_of(rvq), all_paths[None].expand(1, -1, -1)[0][j].expand(60, 3), w)
                          for j in range(64)], -1)  # (60, 64)
    best = scores.min(-1).values
    two = scores.topk(2, dim=-1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-6 * two[:, 1]
    assert clear.float().mean() > 0.9
    assert torch.equal(path[clear], all_paths[scores.argmin(-1)][clear])
    torch.testing.assert_close(path_score64(x, codebooks_of(rvq), path, w), best, rtol=1e-6, atol=1e-9)


def test_beam_search_never_worse_than_greedy_and_beam_1_is_greedy():
    for seed in range(25):
        torch.manual_seed(seed)
        q, k = 2 + seed % 3, 3 + seed % 4
        rvq = ResidualVQ(dim=3, num_quantizers=q, codebook_size=k, beam_size=2)
        x = randn(40, 3, seed=100 + seed)
        greedy = greedy64(x, codebooks_of(rvq))
        assert torch.equal(layer_path(rvq, x, 1), greedy)  # forward beam_size=1: greedy (fp64)
        codebooks = codebooks_of(rvq)

        def stage(j, residual, so_far, width, codebooks=codebooks, k=k):
            from vq_layers.kernels.nearest_code import nearest_codes
            idx, distances = nearest_codes(residual.reshape(-1, 3), codebooks[j], "l2", min(width, k))
            return (idx.reshape(*residual.shape[:2], -1), distances.reshape(*residual.shape[:2], -1),
                    lambda beam, index: codebooks[j][index])

        stages = [lambda r, s, w, j=j: stage(j, r, s, w) for j in range(q)]
        assert torch.equal(beam_search(x, stages, 1, [1.0] * q), greedy)  # beam_size=1 is greedy
        for beam in (2, 3, 5):
            path = layer_path(rvq, x, beam)
            worse = path_score64(x, codebooks, path, [1.0] * q) - path_score64(x, codebooks, greedy, [1.0] * q)
            assert (worse <= 1e-6).all(), (seed, beam, worse.max())


def test_beam_search_training_updates_along_the_chosen_path():
    """decay=0: each used code becomes the mean of the residuals that chose it on the returned
    path (fp64), the greedy path would give other residuals; losses are that path's."""
    torch.manual_seed(3)
    rvq = ResidualVQ(dim=2, num_quantizers=2, codebook_size=4, beam_size=4, decay=0.0, eps=1e-12).train()
    before = codebooks_of(rvq)
    before = [c.clone() for c in before]
    x = randn(1, 50, 2, seed=8)
    out, indices, losses = rvq(x)
    path = indices[0]
    residual = x[0].to(F64)
    for k, layer in enumerate(rvq.layers):
        chosen = path[:, k]
        torch.testing.assert_close(losses[k].to(F64), (residual - before[k].to(F64)[chosen]).square().mean(),
                                   rtol=1e-5, atol=1e-7)
        for j in chosen.unique():
            torch.testing.assert_close(layer.codebook.detach()[j].to(F64), residual[chosen == j].mean(0),
                                       rtol=1e-5, atol=1e-6)
        residual = residual - before[k].to(F64)[chosen]
    assert torch.equal(out, sum(before[k][path[:, k]] for k in range(2))[None])


def test_beam_search_mask_and_dropout():
    rvq = ResidualVQ(dim=3, num_quantizers=3, codebook_size=5, beam_size=3, quantize_dropout=True).train()
    mask = torch.tensor([[True, True, False, True]])
    out, indices, _ = rvq(randn(1, 4, 3, seed=9), mask=mask, rand_quantize_dropout_fixed_seed=0)
    assert (indices[0, 2] == -1).all() and (out[0, 2] == 0).all()
    kept = int((indices[0, 0] >= 0).sum())
    assert (indices[0, [0, 1, 3], :kept] >= 0).all() and (indices[..., kept:] == -1).all()


def test_beam_search_errors():
    with pytest.raises(ValueError, match="eval_beam_size"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, eval_beam_size=2)
    with pytest.raises(ValueError, match="beam_score_quantizer_weights"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, beam_size=2, beam_score_quantizer_weights=[1.0])
    with pytest.raises(ValueError, match="use_cosine_sim"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, beam_size=2, use_cosine_sim=True)
    with pytest.raises(ValueError, match="beam_size"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, beam_size=0)
    with pytest.raises(ValueError, match="beam_size"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)(randn(1, 2, 4), beam_size=-1)


def test_grouped_passes_the_extras_through():
    grouped = GroupedResidualVQ(dim=8, groups=2, codebook_size=(8, 4), beam_size=3, quant_grad_frac=0.5,
                                implicit_neural_codebook=True, mlp_kwargs=dict(depth=1)).eval()
    out, indices, losses = grouped(randn(2, 5, 8, seed=10))
    assert out.shape == (2, 5, 8) and indices.shape == (2, 2, 5, 2) and losses.shape == (2, 2)
    assert all(rvq.beam_size == 3 and rvq.mlps is not None and rvq.codebook_sizes == (8, 4) for rvq in grouped.rvqs)
    torch.testing.assert_close(grouped.get_output_from_indices(indices), out, rtol=1e-5, atol=1e-6)


CONFIGS = {
    "beam": dict(dim=6, num_quantizers=3, codebook_size=8, codebook_dim=4, beam_size=3),
    "implicit_beam": dict(dim=6, num_quantizers=2, codebook_size=(8, 6), implicit_neural_codebook=True,
                          mlp_kwargs=dict(depth=1), beam_size=2, quant_grad_frac=0.5),
}


@pytest.mark.parametrize("cell", dtype_matrix())
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dtype_matrix(name, cell):
    run_cell(cell, lambda: ResidualVQ(**CONFIGS[name]), lambda dt: randn(2, 5, 6, seed=11).to(dt),
             unpack=lambda r: Parts(r[0], indices=[r[1]], losses=[r[2].sum()]))


# ------------------------------------------------------------------------------------------
# distributed: 2 ranks on half batches == 1 process on the whole batch


def _beam_worker(rank, world_size):
    kw = dict(dim=3, num_quantizers=2, codebook_size=6, beam_size=3, decay=0.5, threshold_ema_dead_code=0.5)
    torch.manual_seed(rank)  # ranks built from different seeds: the first step takes rank 0's codebooks
    synced = ResidualVQ(**kw).train()
    torch.manual_seed(0)
    whole = ResidualVQ(sync_codebook=False, **kw).train()
    for step in range(2):
        x = randn(2, 8, 3, seed=step)
        _, mine, _ = synced(x[rank : rank + 1])  # dead-code rows: drawn as `whole` draws them (rank 0's seed)
        _, reference, _ = whole(x)
        assert torch.equal(mine, reference[rank : rank + 1]), f"step {step}: another path than one process"
    for (name, a), (_, b) in zip(synced.named_buffers(), whole.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    parts = [torch.empty_like(synced.layers[1].codebook) for _ in range(world_size)]
    dist.all_gather(parts, synced.layers[1].codebook.contiguous())
    assert torch.equal(parts[0], parts[1])


def test_distributed_beam_search_half_batches_equal_whole_batch():
    run_in_processes(_beam_worker, 2, timeout=120)


@pytest.mark.parametrize("train", [True, False])
def test_beam_search_empty_and_all_masked_batches(train):
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, beam_size=3, implicit_neural_codebook=True).train(train)
    out, indices, losses = rvq(randn(0, 5, 4))
    assert out.shape == (0, 5, 4) and indices.shape == (0, 5, 3) and (losses == 0).all()
    out, indices, losses = rvq(randn(2, 5, 4), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert (out == 0).all() and (indices == -1).all()


def test_diveq_on_the_sum_of_stages():
    """Training: x + v ||sum q - x|| (v read off the output, fp64), gradients by the formula to
    the input and every stage's codebook; eval: the codes exactly; the peer's defaults."""
    torch.manual_seed(4)
    rvq = ResidualVQ(dim=3, num_quantizers=2, codebook_size=6, diveq=True).train()
    assert rvq.quant_grad_frac == 1.0
    assert all(layer.learnable_codebook and not layer.ema_update and layer.commitment_weight == 0
               for layer in rvq.layers)
    x = randn(2, 5, 3, seed=12).requires_grad_()
    before = [c.clone() for c in codebooks_of(rvq)]
    out, indices, losses = rvq(x)
    assert (losses == 0).all()
    q = sum(before[k].to(F64)[indices[..., k]] for k in range(2))
    err = q - x.detach().to(F64)
    length = err.norm(dim=-1, keepdim=True)
    v = (out.detach().to(F64) - x.detach().to(F64)) / length
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2, 5, dtype=F64), rtol=1e-6, atol=0)  # (from fp32 values)
    cos = (v * err / length).sum(-1)  # the error direction up to its noise
    assert (cos > 0).all() and cos.mean() > 0.8 and (cos < 1 - 1e-6).all()
    g = randn(2, 5, 3, seed=13)
    out.backward(g)
    along = err / length * (v * g.to(F64)).sum(-1, keepdim=True)
    torch.testing.assert_close(x.grad.to(F64), g.to(F64) - along, rtol=1e-5, atol=1e-6)
    for k, layer in enumerate(rvq.layers):
        expected = torch.zeros(6, 3, dtype=F64).index_add_(0, indices[..., k].flatten(), along.reshape(-1, 3))
        torch.testing.assert_close(layer._codebook.embed.grad[0].to(F64), expected, rtol=1e-5, atol=1e-6)
    out, indices, _ = rvq.eval()(x)
    assert torch.equal(out, rvq.get_output_from_indices(indices))
    with pytest.raises(ValueError, match="ema_update"):
        ResidualVQ(dim=3, num_quantizers=2, codebook_size=6, diveq=True, ema_update=True)


def test_beam_search_nan_in_training_raises_before_any_buffer_changes():
    rvq = ResidualVQ(dim=3, num_quantizers=2, codebook_size=6, beam_size=3).train()
    state = {k: v.clone() for k, v in rvq.state_dict().items()}
    x = randn(2, 4, 3, seed=14)
    x[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        rvq(x)
    assert all(torch.equal(v, rvq.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------------------------------
# beam search in training with the statistics extras, its memory, GroupedResidualVQ


def all_path_scores64(x, codebooks, k, q):
    """fp64 score of every one of the k^q paths -> (m, k^q)."""
    paths = torch.tensor(list(itertools.product(range(k), repeat=q)))
    return torch.stack([path_score64(x, codebooks, p.expand(x.shape[0], q), [1.0] * q) for p in paths], -1)


TRAINING_EXTRAS = {
    "ema": dict(),
    "sync_update_v": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "straight_through": dict(straight_through=True, rotation_trick=False),
    "affine_param": dict(affine_param=True),
    "in_place": dict(learnable_codebook=True, ema_update=False,
                     in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=5.0)),
}


@pytest.mark.parametrize("extra", sorted(TRAINING_EXTRAS))
def test_beam_search_in_training_with_statistics_extras(extra):
    """K = 4, q = 3, beam_size 16 in a training step: either a ValueError (the stages would change
    their codebooks before quantizing) or the exhaustive optimum over the codebooks the step used,
    never worse than their greedy path, and the output is that path's codes."""
    torch.manual_seed(5)
    kwargs = dict(dim=2, num_quantizers=3, codebook_size=4, commitment_weight=0.0, **TRAINING_EXTRAS[extra])
    x = randn(1, 64, 2, seed=15)
    if extra in ("affine_param", "in_place"):
        with pytest.raises(ValueError, match="beam_size: beam search in training is not supported"):
            ResidualVQ(beam_size=16, **kwargs)
        rvq = ResidualVQ(beam_size=1, eval_beam_size=16, **kwargs).train()
        with pytest.raises(ValueError, match="beam_size: beam search in training is not supported"):
            rvq(x, beam_size=16)  # forward's beam_size in a training step
        rvq(x, beam_size=16, freeze_codebook=True)  # no update: the codebooks searched are those used
        rvq.eval()(x)  # eval_beam_size
        return
    rvq = ResidualVQ(beam_size=16, **kwargs).train()
    used = [c.clone() for c in codebooks_of(rvq)]
    out, indices, _ = rvq(x.clone().requires_grad_())
    path = indices[0]
    scores = all_path_scores64(x[0], used, 4, 3)
    score = path_score64(x[0], used, path, [1.0] * 3)
    torch.testing.assert_close(score, scores.min(-1).values, rtol=1e-6, atol=1e-9)
    assert (score <= path_score64(x[0], used, greedy64(x[0], used), [1.0] * 3) + 1e-9).all()
    torch.testing.assert_close(out[0].detach(), sum(used[k][path[:, k]] for k in range(3)), rtol=1e-6, atol=1e-6)


def test_implicit_neural_codebook_refuses_the_in_place_optimizer():
    with pytest.raises(ValueError, match="implicit_neural_codebook, in_place_codebook_optimizer"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True,
                   in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


@pytest.mark.parametrize("implicit", [False, True])
def test_beam_search_memory_is_not_beams_squared_times_dim(implicit, monkeypatch):
    """No tensor of m x B x B x d: candidates are scored from the search's distances and only
    the kept ones' codes are gathered (per-token codebooks, m x B x K x d, are inherent)."""
    import vq_layers.kernels.nearest_code as nc

    monkeypatch.setattr(nc, "TILE_ELEMENTS", 2048)  # the search's own blocks: far below m x B x B x d
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class MaxNumel(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
            return out

    m, beam, d, k = 64, 8, 16, 8 if implicit else 64
    rvq = ResidualVQ(dim=d, num_quantizers=3, codebook_size=k, beam_size=beam, implicit_neural_codebook=implicit,
                     mlp_kwargs=dict(depth=1, dim_hidden=4)).eval()
    x = randn(1, m, d, seed=16)
    with torch.no_grad(), MaxNumel() as seen:
        rvq(x)
    inherent = m * beam * k * d if implicit else 0
    assert seen.largest <= max(inherent, m * beam * beam * d // 4), (seen.largest, m * beam * beam * d)


def test_forward_beam_size_takes_integral_values_and_zero_is_greedy():
    torch.manual_seed(6)
    rvq = ResidualVQ(dim=2, num_quantizers=3, codebook_size=4, beam_size=16).eval()
    x = randn(1, 40, 2, seed=17)
    greedy = greedy64(x[0], codebooks_of(rvq))
    for width in (0, 1):
        assert torch.equal(rvq(x, beam_size=width)[1][0], greedy)
    wide = rvq(x, beam_size=16)[1]
    np = pytest.importorskip("numpy")
    for width in (torch.tensor(16), np.int64(16)):
        assert torch.equal(rvq(x, beam_size=width)[1], wide)
    for bad in (-1, 2.5, True, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="beam_size"):
            rvq(x, beam_size=bad)


def test_grouped_forward_beam_size_and_codebooks_with_sizes_per_stage():
    torch.manual_seed(7)
    grouped = GroupedResidualVQ(dim=4, groups=2, num_quantizers=3, codebook_size=4).eval()
    x = randn(1, 30, 4, seed=18)
    _, indices, _ = grouped(x, beam_size=16)
    for g, chunk in enumerate(x.chunk(2, dim=-1)):
        assert torch.equal(indices[g], grouped.rvqs[g](chunk, beam_size=16)[1])
    assert not torch.equal(indices, grouped(x)[1])  # greedy differs somewhere
    sized = GroupedResidualVQ(dim=4, groups=2, codebook_size=(8, 4))
    codebooks = sized.codebooks
    assert len(codebooks) == 2 and all(len(c) == 2 for c in codebooks)
    assert all(torch.equal(codebooks[g][k], sized.rvqs[g].layers[k].codebook) for g in range(2) for k in range(2))
    assert GroupedResidualVQ(dim=4, groups=2, num_quantizers=3, codebook_size=8).codebooks.shape == (2, 3, 8, 2)


def test_implicit_neural_codebook_beam_search_wide_enough_is_the_exhaustive_optimum():
    """QINCo stages (each beam's codebook conditioned on its own reconstruction): K = 3, q = 3,
    beam_size 9 = K^(q-1) returns the best of all 27 paths, scored in fp64 from the codes
    get_codes_from_indices gives each path (chosen codes transformed one by one, no per-token codebook)."""
    torch.manual_seed(8)
    rvq = ResidualVQ(dim=2, num_quantizers=3, codebook_size=3, implicit_neural_codebook=True,
                     mlp_kwargs=dict(depth=1, dim_hidden=8)).eval()
    x = randn(1, 40, 2, seed=19)
    path = rvq(x, beam_size=9)[1][0]  # (40, 3)
    all_paths = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, 3)
    with torch.no_grad():
        codes = rvq.get_codes_from_indices(all_paths[None].expand(40, -1, -1)).to(F64)  # (3, 40, 27, 2)
    residuals = x[0, :, None].to(F64) - codes.cumsum(0)  # after each stage
    scores = residuals.square().mean(-1).sum(0)  # (40, 27)
    chosen = scores.gather(1, (path * torch.tensor([9, 3, 1])).sum(-1, keepdim=True))[:, 0]
    torch.testing.assert_close(chosen, scores.min(-1).values, rtol=1e-5, atol=1e-7)
