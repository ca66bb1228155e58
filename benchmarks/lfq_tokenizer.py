"""LFQ training steps at tokenizer sizes (2^8-2^10 codes, 256-1024 tokens, as image tokenizers'
own tests run them: MUSE/MaskGIT, MAGVIT-v2), vq_layers vs vector-quantize-pytorch: with and
without projections (dim 64 vs dim = log2(codes) x codebooks), 1 and 2 codebooks, spherical.
At these sizes a step is milliseconds, so what counts is the fixed cost per call (Python, ops).

    python -m benchmarks.lfq_tokenizer          # writes benchmarks/results/lfq-tokenizer-<machine>.*
    python -m benchmarks.lfq_tokenizer --quick  # 256 tokens only

Each implementation runs in a fresh subprocess; the time is the median of many steps (at least
MIN_REPEATS) after one warm-up step, forward + backward, inv_temperature 100 (both defaults).
"""

from __future__ import annotations

import sys

from benchmarks.common import PEER, bench_main, time_steps

NAME = "lfq-tokenizer"
TITLE = "LFQ training step (forward + backward) at tokenizer sizes"
KEYS = ["codebook_size", "num_codebooks", "dim", "tokens", "spherical"]
CONFIGS = [  # (codebook_size, num_codebooks, dim, tokens, spherical)
    (2**8, 1, 8, 256, False),
    (2**8, 1, 64, 256, False),
    (2**10, 1, 10, 256, False),
    (2**10, 1, 64, 256, True),
    (2**10, 2, 64, 256, False),
    (2**10, 1, 10, 1024, False),
    (2**10, 1, 64, 1024, False),
    (2**10, 2, 20, 1024, False),
    (2**10, 2, 64, 1024, True),
    (2**10, 1, 10, 1024, True),
]
IMPLS = ["vq_layers", PEER, "sign-only bound"]
MIN_REPEATS = 40
NOTE = ("(× = that implementation's time or added peak RSS over vq_layers'; > 1 means vq_layers is faster or "
        "leaner. The sign-only bound: the same projections and a straight-through sign, no entropy)")


def peer_gib(*config) -> None:
    return None  # small: the peer always fits


def measure_one(codebook_size: int, num_codebooks: int, dim: int, tokens: int, spherical: bool, impl: str,
                repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    import torch

    torch.manual_seed(0)
    if impl == "sign-only bound":
        bits = (codebook_size.bit_length() - 1) * num_codebooks
        project = [torch.nn.Linear(dim, bits), torch.nn.Linear(bits, dim)] if dim != bits else []
        layer = torch.nn.Sequential(*project).to(device)

        def step(x):
            z = layer[0](x) if project else x
            out = z + (torch.where(z > 0, 1.0, -1.0) - z).detach()
            (layer[1](out) if project else out).square().mean().backward()
            layer.zero_grad(set_to_none=True)

        x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
        return time_steps(step, x, max(repeats, MIN_REPEATS), device)
    if impl == "vq_layers":
        from vq_layers import LFQ
    else:
        from vector_quantize_pytorch import LFQ
    layer = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, spherical=spherical,
                entropy_loss_weight=0.1).to(device).train()

    def step(x):
        out, _, aux_loss = layer(x)
        (out.square().mean() + aux_loss).backward()
        layer.zero_grad(set_to_none=True)

    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    return time_steps(step, x, max(repeats, MIN_REPEATS), device)


COLUMNS = [
    ("codes", lambda r: f"2^{r['codebook_size'].bit_length() - 1}"),
    ("codebooks", lambda r: str(r["num_codebooks"])),
    ("dim", lambda r: str(r["dim"])),
    ("tokens", lambda r: str(r["tokens"])),
    ("spherical", lambda r: "yes" if r["spherical"] else ""),
]


def main() -> None:
    bench_main(sys.modules[__name__], "256 tokens only", 300, quick=lambda *config: config[3] <= 256)


if __name__ == "__main__":
    main()
