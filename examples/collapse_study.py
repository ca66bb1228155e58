"""Codebook collapse study: code usage and reconstruction of quantizer variants on the digits.

    python examples/collapse_study.py                          # every variant, 2 seeds: ~20 min on 2 cores
    python examples/collapse_study.py --steps 100 --variants vq-plain,vq-kmeans-dead
    python examples/collapse_study.py --out outputs/collapse_study.md

Trains the tokenizer of examples/train_tokenizer.py (same model, data split, batch size,
learning rate and bf16 autocast) once per variant and seed, every variant with a 1024-code
codebook (FSQ: levels with about 1024 codes), and prints a markdown table of held-out MSE,
perplexity and codebook usage, mean ± half the range over the seeds. "replaced" is the total
of VectorQuantize's dead codes replaced over training (codebook_health), "s" the seconds per
run. docs/training-guide.md discusses the results.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# model, data, builders and command-line helpers of the main example, which sits next to this one
import train_tokenizer
from train_tokenizer import (
    LATENT_DIM,
    QUANTIZERS,
    OneLineParser,
    Tokenizer,
    evaluate,
    load_splits,
    positive,
)
from vq_layers import FSQ, LFQ, VectorQuantize

CODEBOOK_SIZE = 1024


class Variant(NamedTuple):
    keywords: str  # what differs, for the table
    build: Callable[[], nn.Module]


def vq(**kwargs) -> Callable[[], nn.Module]:
    return functools.partial(VectorQuantize, dim=LATENT_DIM, codebook_size=CODEBOOK_SIZE,
                             accept_image_fmap=True, **kwargs)


def lfq(inv_temperature: float = 100.0, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layer = LFQ(dim=LATENT_DIM, codebook_size=CODEBOOK_SIZE, **kwargs)
        # inv_temperature is a forward keyword; Tokenizer calls quantizer(x), so bind it here
        layer.forward = functools.partial(layer.forward, inv_temperature=inv_temperature)
        return layer
    return build


def fsq(levels: list[int]) -> Callable[[], nn.Module]:
    return functools.partial(FSQ, levels=levels, dim=LATENT_DIM)


VARIANTS = {
    # VectorQuantize: EMA codebook, rotation trick on by default (rotation_trick=None -> True)
    "vq-plain": Variant("defaults: EMA, random init, no dead-code replacement, rotation trick", vq()),
    "vq-kmeans": Variant("`kmeans_init=True`", vq(kmeans_init=True)),
    "vq-dead": Variant("`threshold_ema_dead_code=2`", vq(threshold_ema_dead_code=2)),
    "vq-kmeans-dead": Variant("`kmeans_init=True, threshold_ema_dead_code=2`",
                              vq(kmeans_init=True, threshold_ema_dead_code=2)),
    "vq-kmeans-dead0.2": Variant("`kmeans_init=True, threshold_ema_dead_code=0.2`",
                                 vq(kmeans_init=True, threshold_ema_dead_code=0.2)),
    "vq-cosine": Variant("`use_cosine_sim=True`", vq(use_cosine_sim=True)),
    "vq-cdim8": Variant("`codebook_dim=8`", vq(codebook_dim=8)),
    "vq-example": Variant("`codebook_dim=8, kmeans_init=True, threshold_ema_dead_code=2` (train_tokenizer's vq)",
                          functools.partial(QUANTIZERS["vq"], LATENT_DIM, CODEBOOK_SIZE)),
    "vq-straight-through": Variant("`rotation_trick=False` (plain straight-through)", vq(rotation_trick=False)),
    "vq-learnable": Variant("`learnable_codebook=True, ema_update=False`",
                            vq(learnable_codebook=True, ema_update=False)),
    "fsq-8555": Variant("`levels=[8, 5, 5, 5]` (1000 codes, train_tokenizer's fsq)", fsq([8, 5, 5, 5])),
    "fsq-44444": Variant("`levels=[4, 4, 4, 4, 4]` (1024 codes)", fsq([4, 4, 4, 4, 4])),
    "lfq": Variant("defaults: `entropy_loss_weight=0.1`, inv_temperature 100", lfq()),
    "lfq-ent0": Variant("`entropy_loss_weight=0`", lfq(entropy_loss_weight=0.0)),
    "lfq-ent1": Variant("`entropy_loss_weight=1`", lfq(entropy_loss_weight=1.0)),
    "lfq-invt10": Variant("`inv_temperature=10` (forward)", lfq(inv_temperature=10.0)),
    "lfq-spherical": Variant("`spherical=True` (BSQ; train_tokenizer's lfq)", lfq(spherical=True)),
    "lfq-spherical-ent0": Variant("`spherical=True, entropy_loss_weight=0`",
                                  lfq(spherical=True, entropy_loss_weight=0.0)),
}


class Result(NamedTuple):
    mse: float
    perplexity: float
    usage: float
    replaced: int | None  # dead codes replaced over training (VectorQuantize only)
    seconds: float


def run(variant: Variant, steps: int, seed: int, autocast_on: bool) -> Result:
    """Trains one tokenizer as train_tokenizer.main does (CPU) and evaluates it on held-out digits."""
    defaults = train_tokenizer.parse_args([])  # batch size and learning rate of the main example
    start = time.perf_counter()
    torch.manual_seed(seed)
    train, test, _ = load_splits(seed)
    quantizer = variant.build()
    model = Tokenizer(quantizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=autocast_on)
    batches = torch.Generator().manual_seed(seed)
    replaced = torch.zeros((), dtype=torch.long) if isinstance(quantizer, VectorQuantize) else None
    for _ in range(steps):
        images = train[torch.randint(len(train), (defaults.batch_size,), generator=batches)]
        with autocast():
            recon, indices, aux_loss = model(images)
        loss = F.mse_loss(recon.float(), images) + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if replaced is not None:  # the codes this step's dead-code replacement revived
            replaced += quantizer.codebook_health(indices).dead_codes_replaced

    mse, _, _, usage = evaluate(model, quantizer, test, autocast)
    return Result(mse, usage.perplexity.item(), usage.usage.item(),
                  None if replaced is None else int(replaced), time.perf_counter() - start)


def summary(values: list[float], spec: str) -> str:
    """Mean, and ± half the range when there are several seeds."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{mean:{spec}} ± {(max(values) - min(values)) / 2:{spec}}"


def table_row(name: str, variant: Variant, results: list[Result]) -> str:
    replaced = [r.replaced for r in results]
    cells = [
        name, variant.keywords,
        summary([r.mse for r in results], ".4f"),
        summary([r.perplexity for r in results], ".1f"),
        summary([r.usage for r in results], ".3f"),
        "—" if replaced[0] is None else summary(replaced, ".0f"),
        summary([r.seconds for r in results], ".0f"),
    ]
    return "| " + " | ".join(cells) + " |"


def comma_list(cast):
    """argparse type: 'a,b,c' -> [cast(a), cast(b), cast(c)], no empty items."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [cast(item) for item in items]

    parse.__name__ = f"comma-separated {cast.__name__}"
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=positive(int), default=500, help="training steps per run")
    parser.add_argument("--variants", type=comma_list(str), default=list(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1],
                        help="one run per seed (init, split and batches)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--no-autocast", action="store_true",
                        help="train in fp32 instead of under bf16 autocast")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"argument --variants: unknown variant(s) {', '.join(map(repr, unknown))} "
                     f"(choose from {', '.join(VARIANTS)})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as train_tokenizer on CPU: ops this small gain nothing from threads
    precision = "fp32" if args.no_autocast else "bf16 autocast"
    print(f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))}, {precision}, CPU, "
          f"torch {torch.__version__}", file=sys.stderr)

    lines = ["| variant | keywords | held-out MSE | perplexity | usage | replaced | s |",
             "|---|---|---|---|---|---|---|"]
    for name in args.variants:
        results = [run(VARIANTS[name], args.steps, seed, not args.no_autocast) for seed in args.seeds]
        lines.append(table_row(name, VARIANTS[name], results))
        print(f"{name}: " + ", ".join(f"seed {s}: mse={r.mse:.4f} ppl={r.perplexity:.1f} usage={r.usage:.3f}"
                                      for s, r in zip(args.seeds, results)), file=sys.stderr)
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
