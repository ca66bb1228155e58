"""Train a small convolutional image tokenizer on scikit-learn's 8x8 digits.

    python examples/train_tokenizer.py                   # FSQ, about a minute on 2 CPU cores
    python examples/train_tokenizer.py --quantizer rfsq  # residual FSQ, two stages
    python examples/train_tokenizer.py --quantizer lfq   # lookup-free quantization

The encoder turns each 8x8 image into a 4x4 grid of feature vectors, the quantizer replaces
each vector by one of `--codebook-size` codes (a token), and the decoder rebuilds the image
from the quantized grid. FSQ has no codebook to learn, so the loss is reconstruction MSE alone.
Writes reconstructions.png and codebook_usage.png into --out.

Training runs under bf16 autocast by default. CPUs without native bf16 (no AVX512-BF16/AMX)
emulate it, so there `--no-autocast` (fp32) trains several times faster.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from tqdm import tqdm

from vq_layers import FSQ, LFQ, ResidualFSQ, ResidualVQ, VectorQuantize

# scikit-learn and matplotlib are imported where used, so that --help and bad arguments
# answer without their seconds of import time

LATENT_DIM = 32  # encoder output channels; the quantizer projects them to its code dimension
HELD_OUT = 297  # digits kept out of training for the final evaluation (1500 train)
CODEBOOK_SIZES = [2**8, 2**10, 2**12, 2**14, 2**16]  # the sizes FSQ.levels_for knows


# Quantizer registry: name -> builder(dim, codebook_size). A built quantizer maps channel-first
# features (b, dim, h, w) to (quantized (b, dim, h, w), indices[, aux_loss]) and has
# code_usage(indices). Residual quantizers add a stage axis to the indices (see per_stage).


def build_fsq(dim: int, codebook_size: int) -> nn.Module:
    return FSQ(levels=FSQ.levels_for(codebook_size), dim=dim)


def build_rfsq(dim: int, codebook_size: int) -> nn.Module:
    # codebook_size codes per stage; stage 2 quantizes what stage 1 left over
    levels = FSQ.levels_for(codebook_size)
    return ResidualFSQ(dim=dim, levels=levels, num_quantizers=2, is_channel_first=True)


def build_lfq(dim: int, codebook_size: int) -> nn.Module:
    # signs of log2(codebook_size) projected dims; the exact entropy loss spreads code usage.
    # On the sphere (BSQ) it trains stably here (held-out usage 0.95 at the defaults); plain LFQ
    # collapsed to a handful of codes within 300 steps (usage 0.03), as vector-quantize-pytorch's did
    return LFQ(dim=dim, codebook_size=codebook_size, entropy_loss_weight=0.1, spherical=True)


def build_vq(dim: int, codebook_size: int) -> nn.Module:
    # EMA codebook of 8-dim codes, k-means init on the first batch, unused codes revived from
    # the batch: the usual recipe against codebook collapse
    return VectorQuantize(dim=dim, codebook_size=codebook_size, codebook_dim=8, accept_image_fmap=True,
                          kmeans_init=True, threshold_ema_dead_code=2)


def build_rvq(dim: int, codebook_size: int) -> nn.Module:
    return ResidualVQ(dim=dim, num_quantizers=2, codebook_size=codebook_size, codebook_dim=8,
                      accept_image_fmap=True, kmeans_init=True, threshold_ema_dead_code=2)


QUANTIZERS = {"fsq": build_fsq, "rfsq": build_rfsq, "lfq": build_lfq, "vq": build_vq, "rvq": build_rvq}


class Tokenizer(nn.Module):
    """8x8 image -> 4x4 grid of tokens -> 8x8 image."""

    def __init__(self, quantizer: nn.Module, dim: int = LATENT_DIM, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 2, stride=2), nn.GELU(),  # 8x8 -> 4x4
            nn.Conv2d(width, dim, 1),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(width, width, 2, stride=2), nn.GELU(),  # 4x4 -> 8x8
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, *aux = self.quantizer(self.encoder(images))
        # FSQ returns no auxiliary loss; VQ/LFQ-style quantizers add a commitment/entropy term
        aux_loss = sum((a.sum() for a in aux), torch.zeros((), device=images.device))
        return self.decoder(quantized), indices, aux_loss


def positive(cast):
    """argparse type: a finite number > 0 of type `cast`."""

    def parse(text: str):
        value = cast(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive {cast.__name__}, got {text!r}")
        return value

    parse.__name__ = cast.__name__  # argparse says "invalid int value" for non-numbers
    return parse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        # one clear line instead of argparse's usage block followed by the error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quantizer", choices=sorted(QUANTIZERS), default="fsq",
                        help="entry of the QUANTIZERS registry")
    parser.add_argument("--steps", type=positive(int), default=1000, help="training steps")
    parser.add_argument("--batch-size", type=positive(int), default=64, help="images per step")
    parser.add_argument("--lr", type=positive(float), default=3e-3,
                        help="Adam learning rate (cosine-decayed to 0)")
    parser.add_argument("--codebook-size", type=int, choices=CODEBOOK_SIZES, default=2**10,
                        help="codes per token, per stage for residual quantizers (FSQ levels "
                        "give about this many: 1024 -> 8*5*5*5 = 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, split and batches")
    parser.add_argument("--out", type=Path, default=Path("outputs/train_tokenizer"),
                        help="output directory for the plots")
    parser.add_argument("--no-autocast", action="store_true",
                        help="train in fp32 instead of under bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ...; cuda when available")
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"argument --device: {err}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine")
    return args


def load_splits(seed: int) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """Digits as (n, 1, 8, 8) standardized with the training split's mean and std."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    images = torch.tensor(load_digits().images, dtype=torch.float32)  # (n, 8, 8), values 0..16
    images = rearrange(images, "n h w -> n 1 h w")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = images[order[:HELD_OUT]], images[order[HELD_OUT:]]
    mean, std = train.mean().item(), train.std().item()
    return (train - mean) / std, (test - mean) / std, (mean, std)


def per_stage(indices: Tensor, quantizer: nn.Module) -> Tensor:
    """(b, h, w), or residual (b, q, h, w) (ResidualFSQ) or (b, h, w, q) (ResidualVQ) -> (q, b*h*w)."""
    if indices.ndim == 3:
        return rearrange(indices, "b h w -> 1 (b h w)")
    pattern = "b h w q" if isinstance(quantizer, ResidualVQ) else "b q h w"
    return rearrange(indices, f"{pattern} -> q (b h w)")


def fmt(values: Tensor, spec: str) -> str:
    """A metric that may have one value per stage -> '1.23' or '1.23/4.56'."""
    return "/".join(format(v, spec) for v in values.reshape(-1).tolist())


def save_reconstructions(path: Path, originals: Tensor, recons: Tensor, columns: int = 12) -> None:
    """Alternating rows of originals and reconstructions, pixel values 0..16."""
    # a Figure made without pyplot renders with the Agg canvas: no display, no global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(columns * 0.8, 4 * 0.9), layout="constrained")
    axes = fig.subplots(4, columns)
    for row in range(4):
        source = originals if row % 2 == 0 else recons
        for col in range(columns):
            ax = axes[row, col]
            ax.imshow(source[(row // 2) * columns + col, 0], cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel("original" if row % 2 == 0 else "recon", fontsize=8)
    fig.savefig(path, dpi=100)


def save_usage_histogram(path: Path, indices: Tensor, quantizer: nn.Module, usage) -> None:
    """Held-out tokens per code index, one panel per residual stage; `usage` titles them."""
    from matplotlib.figure import Figure

    codebook_size = quantizer.codebook_size
    stages = per_stage(indices, quantizer)
    fig = Figure(figsize=(8, 2.5 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), 1, squeeze=False)[:, 0]
    for k, (ax, codes) in enumerate(zip(axes, stages)):
        counts = torch.bincount(codes, minlength=codebook_size)
        ax.stairs(counts.tolist(), fill=True)  # one artist, however many codes
        stage = f"stage {k + 1}: " if len(stages) > 1 else ""
        ax.set_title(
            f"{stage}{int(usage.codes_used.reshape(-1)[k])}/{codebook_size} codes used, "
            f"perplexity {usage.perplexity.reshape(-1)[k].item():.1f}",
            fontsize=9,
        )
        ax.set_xlabel("code index")
        ax.set_ylabel("held-out tokens")
    fig.savefig(path, dpi=100)


def train_loop(model: nn.Module, quantizer: nn.Module, next_batch, steps: int, optimizer, schedule, autocast,
               desc: str) -> None:
    """Reconstruction MSE (fp32) + the quantizer's aux loss, with a progress bar of loss, MSE,
    perplexity and usage. `model(batch)` -> (reconstruction, indices, aux_loss)."""
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        batch = next_batch()
        with autocast():
            recon, indices, aux_loss = model(batch)
        mse = F.mse_loss(recon.float(), batch)  # loss in fp32 whatever the decoder's dtype
        loss = mse + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:  # .item() syncs; not every step
            usage = quantizer.code_usage(indices)
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}",
                            ppl=fmt(usage.perplexity, ".1f"), usage=fmt(usage.usage, ".2f"))


def evaluate(model: nn.Module, quantizer: nn.Module, batch, autocast):
    """-> (MSE, reconstruction, indices, code usage) of the model in eval mode on `batch`."""
    model.eval()
    with torch.no_grad(), autocast():
        recon, indices, _ = model(batch)
    return F.mse_loss(recon.float(), batch).item(), recon, indices, quantizer.code_usage(indices)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    if device.type == "cpu":
        # ops this small gain nothing from intra-op threads, which also stall on busy cores
        torch.set_num_threads(1)
    torch.backends.cudnn.deterministic = True  # CUDA: same seed, same numbers
    torch.manual_seed(args.seed)

    train, test, (mean, std) = load_splits(args.seed)
    train, test = train.to(device), test.to(device)
    quantizer = QUANTIZERS[args.quantizer](LATENT_DIM, args.codebook_size)
    model = Tokenizer(quantizer).to(device)  # parameters stay fp32; autocast casts per op
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    precision = "fp32" if args.no_autocast else "bf16 autocast"
    print(f"{args.quantizer}: {quantizer.codebook_size}-code codebook, 4x4 tokens per image, "
          f"{len(train)} train / {len(test)} held-out digits, {precision} on {device}")

    batches = torch.Generator().manual_seed(args.seed)  # own stream: batch order is seeded too
    train_loop(model, quantizer, lambda: train[torch.randint(len(train), (args.batch_size,), generator=batches)],
               args.steps, optimizer, schedule, autocast, f"train {args.quantizer}")
    mse, recon, indices, usage = evaluate(model, quantizer, test, autocast)
    # mse is in standardized pixel units: 1.0 is what always predicting the mean scores
    print(f"held-out: mse={mse:.4f} perplexity={fmt(usage.perplexity, '.1f')} "
          f"usage={fmt(usage.usage, '.3f')}")

    args.out.mkdir(parents=True, exist_ok=True)
    to_pixels = lambda x: (x.float().cpu() * std + mean).clamp(0, 16)  # noqa: E731
    save_reconstructions(args.out / "reconstructions.png", to_pixels(test), to_pixels(recon))
    save_usage_histogram(args.out / "codebook_usage.png", indices.cpu(), quantizer, usage)
    print(f"wrote reconstructions.png and codebook_usage.png to {args.out.resolve()}")


if __name__ == "__main__":
    main()
