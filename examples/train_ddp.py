"""Train the tokenizer of train_tokenizer.py with DistributedDataParallel, one process per rank.

    torchrun --nproc_per_node=2 examples/train_ddp.py                 # VQ on 2 CPU ranks (gloo)
    torchrun --nproc_per_node=2 examples/train_ddp.py --no-autocast   # fp32: faster on most CPUs
    torchrun --nproc_per_node=2 examples/train_ddp.py --quantizer lfq # any train_tokenizer quantizer
    torchrun --nproc_per_node=2 examples/train_ddp.py --device cuda   # cuda:LOCAL_RANK, nccl
    python examples/train_ddp.py                                      # one process (a group of 1)

The model, data and quantizers are train_tokenizer.py's. Every rank starts from the same
weights (same seed), draws its own batches of --batch-size digits (its own seed), DDP averages
the gradients, and the quantizer keeps its codebook identical on every rank by itself: the
default VQ all-reduces its EMA statistics, samples its k-means init and its dead-code
replacements from all ranks' vectors, and `code_usage` gathers the indices of all ranks. So
each step is, up to those random draws, the step one process would take on the concatenated
batch of (ranks x --batch-size) digits.

What you should see: rank 0 alone prints (a tqdm bar, every 10 steps the loss and mse averaged
over the ranks and the perplexity and usage of the global batch), then

    held-out: mse=0.0328 perplexity=764.7 usage=0.934
    codebooks identical on all 2 ranks: yes (quantizer's 8 parameters and buffers, bitwise)

The held-out line is rank 0's evaluation of the 297 digits kept out of training (mse in
standardized pixel units: 1.0 is what always predicting the mean scores). The last line
gathers every quantizer parameter and buffer from every rank and compares their bytes; the
script exits 1 if any rank differs. About 40 s at the defaults on 2 CPU cores (25 s with
--no-autocast: CPUs without native bf16 emulate it).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from train_tokenizer import (
    CODEBOOK_SIZES,
    LATENT_DIM,
    QUANTIZERS,
    OneLineParser,
    Tokenizer,
    fmt,
    load_splits,
    positive,
)

DDP_ARGS = inspect.signature(DistributedDataParallel).parameters


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quantizer", choices=sorted(QUANTIZERS), default="vq",
                        help="entry of train_tokenizer.py's QUANTIZERS registry")
    parser.add_argument("--steps", type=positive(int), default=300, help="training steps")
    parser.add_argument("--batch-size", type=positive(int), default=32,
                        help="images per step on each rank (the global batch is ranks times this)")
    parser.add_argument("--lr", type=positive(float), default=3e-3,
                        help="Adam learning rate (cosine-decayed to 0)")
    parser.add_argument("--codebook-size", type=int, choices=CODEBOOK_SIZES, default=2**10,
                        help="codes per token, per stage for residual quantizers")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds init and split (alike on all ranks) and batches (per rank)")
    parser.add_argument("--no-autocast", action="store_true",
                        help="train in fp32 instead of under bf16 autocast")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: each rank uses cuda:LOCAL_RANK and nccl; cpu: gloo")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            parser.error(f"argument --device: local rank {local_rank} but only "
                         f"{torch.cuda.device_count()} CUDA devices")
    return args


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """Joins torchrun's process group (env:// rendezvous), or makes a group of one when the
    script runs as a plain process, so that the same DDP code path serves both."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        dist.init_process_group(backend, timeout=timedelta(minutes=5),
                                device_id=device if device.type == "cuda" else None)
    else:  # plain `python train_ddp.py`: an in-memory store, no port to open
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def state_identical(module: nn.Module, world: int) -> tuple[int, list[str]]:
    """All-gathers the bytes of every parameter and buffer of `module` -> (how many compared,
    the names of those that differ between ranks). Every rank must call; all get the answer."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    differ = []
    for name, tensor in tensors:
        # a byte view compares bitwise (NaN == NaN, -0.0 != 0.0) and passes bools through gloo
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        copies = [torch.empty_like(data) for _ in range(world)]
        dist.all_gather(copies, data)
        if not all(torch.equal(copies[0], c) for c in copies[1:]):
            differ.append(name)
    return len(tensors), differ


def main(argv=None) -> int:
    args = parse_args(argv)  # before joining the group: a bad argument fails fast on every rank
    rank, world, device = init_distributed(args.device)
    if device.type == "cpu":
        # ranks share the cores, and ops this small gain nothing from intra-op threads
        torch.set_num_threads(1)
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(args.seed)  # same model init on every rank (DDP broadcasts rank 0's anyway)

    train, test, _ = load_splits(args.seed)  # the same split on every rank
    train, test = train.to(device), test.to(device)
    quantizer = QUANTIZERS[args.quantizer](LATENT_DIM, args.codebook_size)
    model = Tokenizer(quantizer).to(device)
    # broadcast_buffers=False: by default DDP re-broadcasts rank 0's buffers at every forward.
    # That is redundant here: the quantizer keeps its buffers (codebook, EMA counts and sums,
    # k-means flag) identical on all ranks itself, all-reducing the codebook statistics inside
    # the layer, and the tokenizer has no other buffers (no batch norm). The check at the end
    # verifies it. Newer torch calls the flag forward_sync_buffers and warns at the old name;
    # it still copies rank 0's buffers once at construction, which the old flag skipped (the
    # same seed makes them equal anyway).
    flag = "forward_sync_buffers" if "forward_sync_buffers" in DDP_ARGS else "broadcast_buffers"
    device_ids = [device.index] if device.type == "cuda" else None
    ddp_model = DistributedDataParallel(model, device_ids=device_ids, **{flag: False})
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    if rank == 0:
        precision = "fp32" if args.no_autocast else "bf16 autocast"
        print(f"{args.quantizer}: {quantizer.codebook_size}-code codebook, {world} rank(s) x "
              f"{args.batch_size} = {world * args.batch_size} digits per step, {len(train)} train / "
              f"{len(test)} held-out digits, {precision} on {device.type} ({dist.get_backend()})",
              flush=True)

    # each rank its own stream of batches; rank 0 draws those train_tokenizer.py would
    batches = torch.Generator().manual_seed(args.seed + rank * 100_003)
    bar = tqdm(range(args.steps), desc=f"train {args.quantizer} x{world}", disable=rank != 0)
    for step in bar:
        images = train[torch.randint(len(train), (args.batch_size,), generator=batches)]
        with autocast():
            recon, indices, aux_loss = ddp_model(images)
        mse = F.mse_loss(recon.float(), images)
        loss = mse + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == args.steps - 1:
            # collectives: every rank takes this branch at the same steps, rank 0 alone prints
            usage = quantizer.code_usage(indices)  # gathers the indices of every rank
            losses = torch.stack([loss.detach(), mse.detach()]).float()
            dist.all_reduce(losses)  # SUM (gloo has no AVG)
            losses /= world
            bar.set_postfix(loss=f"{losses[0].item():.4f}", mse=f"{losses[1].item():.4f}",
                            ppl=fmt(usage.perplexity, ".1f"), usage=fmt(usage.usage, ".2f"))
    bar.close()

    # a group of rank 0 alone: code_usage with it counts rank 0's indices without a collective
    # (new_group is itself collective: every rank creates it, only rank 0 uses it)
    rank0_only = dist.new_group([0])
    if rank == 0:
        model.eval()  # the plain module: eval and no_grad forwards issue no collective
        with torch.no_grad(), autocast():
            recon, indices, _ = model(test)
        mse = F.mse_loss(recon.float(), test).item()
        usage = quantizer.code_usage(indices, process_group=rank0_only)
        print(f"held-out: mse={mse:.4f} perplexity={fmt(usage.perplexity, '.1f')} "
              f"usage={fmt(usage.usage, '.3f')}", flush=True)

    compared, differ = state_identical(quantizer, world)
    if rank == 0:
        ranks = f"all {world} ranks" if world > 1 else "the 1 rank"
        verdict = "yes" if not differ else f"NO, differ: {', '.join(differ)}"
        print(f"codebooks identical on {ranks}: {verdict} "
              f"(quantizer's {compared} parameters and buffers, bitwise)", flush=True)
    dist.destroy_process_group()
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
