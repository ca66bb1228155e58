"""FSDP in real process groups (see `dist_utils`): FSDP2 training against one process, bf16 mixed
precision, learnable (sharded) codebooks and the in-place rule; FSDP1 mixed precision on CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_utils import (
    LATENT,
    LR,
    STEPS,
    WORLD,
    _assert_close_state,
    _assert_finite,
    _assert_identical_across_ranks,
    _AutoEncoder,
    _batch,
    _fully_shard,
    _state,
    _train_and_compare,
    _train_step,
    run_in_processes,
)


def _quiet_fsdp():
    # FSDP2 warns that a wrapped Linear returned a view (a harmless (b, n, d) reshape)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


# ------------------------------------------------------------------------------------------
# 2. FSDP2 training: identical across ranks, equal to one process on the global batch


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
