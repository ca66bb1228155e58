"""Codebook as the owner of its state: the affine frame's keys, checkpoints of the layout before
it, and the explicit-state functions it calls (dead_codes.py, kmeans.kmeans_init_).

The old layout is written out here literally (the keys vq_layers saved while the moments sat on
the codebook itself, as vector-quantize-pytorch keeps them), not derived from the code under test.
"""

from __future__ import annotations

import pytest
import torch

from reference import randn
from vq_layers import ResidualVQ, VectorQuantize
from vq_layers.dead_codes import revive_dead_codes_
from vq_layers.kmeans import kmeans_init_

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FRAME = ("codebook_mean", "codebook_variance", "batch_mean", "batch_variance", "codebook_mean_needs_init",
         "codebook_variance_needs_init")
# the keys of a trained VectorQuantize(affine_param=True) with pending accumulated statistics, as
# saved before the frame became a submodule
OLD_KEYS = ["_codebook.initted", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.embed",
            "_codebook.codebook_mean", "_codebook.codebook_variance", "_codebook.batch_mean",
            "_codebook.batch_variance", "_codebook.codebook_mean_needs_init",
            "_codebook.codebook_variance_needs_init", "_codebook.accum_cluster_size", "_codebook.accum_embed_sum"]


def old_layout(state_dict):
    """A state dict of the new layout as the old one held it: the frame's keys on the codebook."""
    return {k.replace("_codebook.affine.", "_codebook."): v.clone() for k, v in state_dict.items()}


def make_vq():
    torch.manual_seed(0)
    return VectorQuantize(dim=6, codebook_size=10, heads=2, separate_codebook_per_head=True, codebook_dim=3,
                          affine_param=True, threshold_ema_dead_code=0.5, kmeans_init=True).train()


def trained_vq():
    layer = make_vq()
    for step in range(3):
        layer(randn(2, 9, 6, seed=step) + step)
    layer(randn(2, 9, 6, seed=3), accum_ema_update=True)  # statistics pending
    return layer


def run_steps(layer, seed):
    """Training steps (k-means done, dead codes revived, pending statistics applied), then eval:
    every index and output, and the final state."""
    outs = []
    for step in range(3):
        out, indices, loss = layer.train()(randn(2, 9, 6, seed=seed + step, scale=2.0))
        outs += [out.detach(), indices, loss.detach()]
    outs += list(layer.eval()(randn(2, 5, 6, seed=seed + 9))[:2])
    return outs, {k: v.clone() for k, v in layer.state_dict().items()}


def test_the_frame_keys_sit_under_affine():
    layer = trained_vq()
    keys = list(layer.state_dict())
    assert [k for k in keys if ".affine." in k] == [f"_codebook.affine.{name}" for name in FRAME]
    assert sorted(old_layout(layer.state_dict())) == sorted(OLD_KEYS)
    assert not any(".affine." in k for k in VectorQuantize(dim=6, codebook_size=10).state_dict())
    for name in FRAME:  # the peer's attribute names still reach the buffers
        assert getattr(layer._codebook, name) is getattr(layer._codebook.affine, name)


def test_a_state_dict_of_the_old_layout_loads_with_identical_behaviour():
    trained = trained_vq()
    saved = old_layout(trained.state_dict())
    loaded = make_vq()
    assert loaded.load_state_dict(saved).missing_keys == []  # strict
    loaded._codebook.sample_draws.step.copy_(trained._codebook.sample_draws.step)  # (row draws: not state)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    outs, state = run_steps(trained, seed=20)
    loaded_outs, loaded_state = run_steps(loaded, seed=20)
    for a, b in zip(outs, loaded_outs):
        assert torch.equal(a, b)
    assert set(state) == set(loaded_state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    # the caller's dict is left as it was
    assert sorted(saved) == sorted(OLD_KEYS)


def test_old_layout_of_residual_stages_and_a_missing_moment():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, affine_param=True).train()
    for step in range(2):
        rvq(randn(2, 7, 4, seed=step))
    saved = {k.replace("._codebook.affine.", "._codebook."): v for k, v in rvq.state_dict().items()}
    assert "layers.1._codebook.batch_mean" in saved
    twin = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, affine_param=True)
    twin.load_state_dict(saved)
    for key, value in rvq.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
    del saved["layers.1._codebook.batch_variance"]  # a cut checkpoint is not filled in
    with pytest.raises(RuntimeError, match=r"layers\.1\._codebook\.affine\.batch_variance"):
        twin.load_state_dict(saved)


def test_frame_keys_without_affine_param_are_unexpected():
    saved = trained_vq().state_dict()
    plain = VectorQuantize(dim=6, codebook_size=10, heads=2, separate_codebook_per_head=True, codebook_dim=3)
    result = plain.load_state_dict(old_layout(saved), strict=False)
    assert sorted(k for k in result.unexpected_keys if "mean" in k or "variance" in k) == sorted(
        f"_codebook.{name}" for name in FRAME)


def test_revive_dead_codes_takes_rows_of_the_batch_lowest_dead_codes_first():
    h, k, d = 2, 6, 3
    embed, embed_avg = randn(h, k, d, seed=1), randn(h, k, d, seed=2)
    cluster_size = torch.full((h, k), 3.0)
    cluster_size[0, [1, 2, 4]] = 0.1  # three dead codes in codebook 0, none in codebook 1
    x = randn(h, 2, d, seed=3)  # two rows per codebook: fewer than codebook 0's dead codes
    before = embed.clone(), embed_avg.clone(), cluster_size.clone()
    seed, step = torch.tensor(7), torch.tensor(0)
    revived = revive_dead_codes_(embed, embed_avg, cluster_size, x, None, threshold=1.0, reset=2.0, cosine=False,
                                 seed=seed, step=step)
    assert int(revived) == 2 and int(step) == 1
    assert sorted(tuple(embed[0, j].tolist()) for j in (1, 2)) == sorted(tuple(r.tolist()) for r in x[0])
    for j in (1, 2):
        assert cluster_size[0, j] == 2.0 and torch.equal(embed_avg[0, j], embed[0, j] * 2.0)
    untouched = torch.ones(h, k, dtype=torch.bool)
    untouched[0, [1, 2]] = False
    for new, old in zip((embed, embed_avg, cluster_size), before):
        assert torch.equal(new[untouched], old[untouched])
    # nothing kept: nothing drawn, nothing revived, the counter stays
    revived = revive_dead_codes_(embed, embed_avg, cluster_size, x, torch.zeros(h, 2, dtype=torch.bool), 1.0, 2.0,
                                 False, seed, step)
    assert int(revived) == 0 and int(step) == 1


def test_kmeans_init_leaves_the_state_without_a_kept_row_in_every_codebook():
    embed, embed_avg, cluster_size = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2, 4)
    initted, step = torch.tensor(False), torch.tensor(0)
    state = [embed, embed_avg, cluster_size, initted, step]
    x = randn(2, 16, 3, seed=4)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1] = False  # codebook 1 has no row
    kmeans_init_(state, x, keep, iters=3, metric="l2", eps=1e-5, seed=torch.tensor(5))
    assert not initted and torch.equal(embed, torch.zeros(2, 4, 3)) and torch.equal(cluster_size, torch.ones(2, 4))
    kmeans_init_(state, x, None, iters=3, metric="l2", eps=1e-5, seed=torch.tensor(5))
    assert initted and int(cluster_size.sum()) == 32
    for h in range(2):  # the statistics are the last assignment's: every row counted once
        torch.testing.assert_close(embed_avg[h].sum(0), x[h].sum(0), rtol=1e-5, atol=1e-5)


def test_a_broadcast_of_initted_is_read_again():
    """The first synced step's broadcast writes `initted` through .data (no version bump): a
    rank that knew its codebook initialized (a checkpoint) must then read the first rank's
    value, or it would skip the k-means init (and its collectives) the other ranks run."""
    from vq_layers.distributed import broadcast_once_

    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True).train()
    vq(randn(2, 6, 4).requires_grad_(True))[0].sum().backward()  # initializes: known on the host
    codebook = vq._codebook
    assert not codebook.needs_init()
    codebook.initted.data.fill_(False)  # what the broadcast does with the first rank's False
    broadcast_once_([codebook])  # (one process: nothing to copy, but the flag is set as on every rank)
    assert codebook.needs_init()
