"""Train a tiny 1-D convolutional audio tokenizer on synthetic 16 kHz clips.

    python examples/audio_tokenizer.py                   # VectorQuantize, under a minute on 2 CPU cores
    python examples/audio_tokenizer.py --quantizer rvq   # ResidualVQ, four stages
    python examples/audio_tokenizer.py --quantizer fsq   # FSQ: no codebook to learn

Each clip is a few decaying tones (random pitch, phase, loudness, onset and decay) plus a little
noise, generated from a seeded torch.Generator: nothing is downloaded, and every training step
draws fresh clips. A strided Conv1d encoder turns every HOP samples into one feature vector, the
quantizer replaces each vector by one of `--codebook-size` codes (a token; ResidualVQ spends
several codes per vector), and a ConvTranspose1d decoder rebuilds the waveform from the tokens.
The loss is reconstruction MSE plus the quantizer's auxiliary (commitment) loss, which FSQ lacks.

The last line sums up the held-out clips: reconstruction MSE next to the MSE of predicting
silence (zeros), codebook perplexity and fraction of codes used (one value per residual stage),
and the bit rate of the token stream.

Training runs under bf16 autocast by default. CPUs without native bf16 (no AVX512-BF16/AMX)
emulate it, so there `--no-autocast` (fp32) trains faster.
"""

from __future__ import annotations

import argparse
import math

import torch
from einops import rearrange
from torch import Tensor, nn

# the command-line and printing helpers of the image example, which sits next to this one
from train_tokenizer import OneLineParser, evaluate, fmt, positive, train_loop
from vq_layers import FSQ, ResidualVQ, VectorQuantize

SAMPLE_RATE = 16_000  # Hz
CLIP_SAMPLES = 2048  # 128 ms clips
HOP = 32  # samples per token: 500 tokens per second
LATENT_DIM = 32  # encoder output channels; the quantizer projects them to its code dimension
HELD_OUT = 64  # clips for the final evaluation, drawn from their own seeded stream
RVQ_STAGES = 4
CODEBOOK_SIZES = [2**8, 2**10, 2**12, 2**14, 2**16]  # the sizes FSQ.levels_for knows


# Quantizer registry: name -> builder(dim, codebook_size). A built quantizer maps tokens
# (b, n, dim) to (quantized (b, n, dim), indices (b, n) or (b, n, stages)[, aux_loss]) and has
# code_usage(indices) (per stage for ResidualVQ).


def build_vq(dim: int, codebook_size: int) -> nn.Module:
    # EMA codebook, k-means init on the first batch, unused codes revived from the batch: the
    # usual recipe against codebook collapse
    return VectorQuantize(dim=dim, codebook_size=codebook_size, kmeans_init=True, threshold_ema_dead_code=2)


def build_rvq(dim: int, codebook_size: int) -> nn.Module:
    # stage k quantizes what stages 1..k-1 left over: RVQ_STAGES tokens per time step
    return ResidualVQ(dim=dim, num_quantizers=RVQ_STAGES, codebook_size=codebook_size,
                      kmeans_init=True, threshold_ema_dead_code=2)


def build_fsq(dim: int, codebook_size: int) -> nn.Module:
    return FSQ(levels=FSQ.levels_for(codebook_size), dim=dim)


QUANTIZERS = {"vq": build_vq, "rvq": build_rvq, "fsq": build_fsq}


def make_clips(count: int, generator: torch.Generator, partials: int = 3) -> Tensor:
    """(count, 1, CLIP_SAMPLES) waveforms: `partials` tones, each with its own log-uniform
    pitch in 100 Hz..2 kHz, phase, loudness, onset (soft attack) and exponential decay."""

    def uniform(low: float, high: float) -> Tensor:
        return torch.empty(count, partials, 1).uniform_(low, high, generator=generator)

    time = torch.arange(CLIP_SAMPLES) / SAMPLE_RATE  # seconds
    duration = CLIP_SAMPLES / SAMPLE_RATE
    frequency = uniform(math.log(100.0), math.log(2000.0)).exp()
    phase, loudness = uniform(0.0, 2 * math.pi), uniform(0.5, 2.5)
    onset, decay = uniform(-duration / 2, duration / 2), uniform(2.0, 30.0)  # decay in 1/s
    since_onset = time - onset
    envelope = torch.sigmoid(since_onset * 2000.0) * torch.exp(-decay * since_onset.clamp(min=0))
    tones = loudness * envelope * torch.sin(2 * math.pi * frequency * time + phase)
    noise = 0.01 * torch.randn(count, 1, CLIP_SAMPLES, generator=generator)
    return tones.sum(dim=1, keepdim=True) + noise


class AudioTokenizer(nn.Module):
    """(b, 1, samples) waveform -> (b, samples / HOP) tokens -> (b, 1, samples) waveform."""

    def __init__(self, quantizer: nn.Module, dim: int = LATENT_DIM, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(  # no conv at the full sample rate: under bf16 it dominated
            nn.Conv1d(1, width, 8, stride=4, padding=2), nn.GELU(),  # HOP = 4 * 8
            nn.Conv1d(width, width, 8, stride=8), nn.GELU(),
            nn.Conv1d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv1d(width, dim, 1),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv1d(dim, width, 3, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose1d(width, width, 8, stride=8), nn.GELU(),
            nn.ConvTranspose1d(width, 1, 4, stride=4),
        )

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens = rearrange(self.encoder(audio), "b d n -> b n d")
        quantized, indices, *aux = self.quantizer(tokens)
        # FSQ returns no auxiliary loss; VQ returns a scalar, ResidualVQ one per stage
        aux_loss = sum((a.sum() for a in aux), torch.zeros((), device=audio.device))
        return self.decoder(rearrange(quantized, "b n d -> b d n")), indices, aux_loss


def torch_device(text: str) -> torch.device:
    """argparse type: a device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return device


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quantizer", choices=list(QUANTIZERS), default="vq",
                        help="entry of the QUANTIZERS registry")
    parser.add_argument("--steps", type=positive(int), default=300, help="training steps")
    parser.add_argument("--batch-size", type=positive(int), default=16, help="clips per step")
    parser.add_argument("--lr", type=positive(float), default=1e-2,
                        help="Adam learning rate (cosine-decayed to 0)")
    parser.add_argument("--codebook-size", type=int, choices=CODEBOOK_SIZES, default=2**10,
                        help="codes per token, per stage for rvq (FSQ levels give about this "
                        "many: 1024 -> 8*5*5*5 = 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, clips and batches")
    parser.add_argument("--no-autocast", action="store_true",
                        help="train in fp32 instead of under bf16 autocast")
    parser.add_argument("--device", type=torch_device,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ...; cuda when available")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    if device.type == "cpu":
        # ops this small gain little from intra-op threads, which also stall on busy cores
        torch.set_num_threads(1)
    torch.backends.cudnn.deterministic = True  # CUDA: same seed, same numbers
    torch.manual_seed(args.seed)

    # held-out clips and training batches come from separate streams of the one seed
    test = make_clips(HELD_OUT, torch.Generator().manual_seed(args.seed + 1)).to(device)
    batches = torch.Generator().manual_seed(args.seed)
    quantizer = QUANTIZERS[args.quantizer](LATENT_DIM, args.codebook_size)
    model = AudioTokenizer(quantizer).to(device)  # parameters stay fp32; autocast casts per op
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    precision = "fp32" if args.no_autocast else "bf16 autocast"
    tokens_per_second = SAMPLE_RATE / HOP
    print(f"{args.quantizer}: {quantizer.codebook_size}-code codebook, {tokens_per_second:g} tokens/s, "
          f"{CLIP_SAMPLES / SAMPLE_RATE * 1000:g} ms clips at {SAMPLE_RATE} Hz, {precision} on {device}")

    train_loop(model, quantizer, lambda: make_clips(args.batch_size, batches).to(device), args.steps,
               optimizer, schedule, autocast, f"train {args.quantizer}")
    mse, _, indices, usage = evaluate(model, quantizer, test, autocast)
    zeros_mse = test.square().mean().item()  # the MSE of predicting silence
    codes_per_token = indices[0, 0].numel()  # 1, or one per residual stage
    bits_per_second = tokens_per_second * codes_per_token * math.log2(quantizer.codebook_size)
    print(f"held-out: mse={mse:.5f} zeros_mse={zeros_mse:.5f} perplexity={fmt(usage.perplexity, '.1f')} "
          f"usage={fmt(usage.usage, '.3f')} bits_per_second={bits_per_second:.0f}")


if __name__ == "__main__":
    main()
