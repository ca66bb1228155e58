"""One VectorQuantize / ResidualVQ training step (forward + backward + EMA update) side by side:
vq_layers vs vector-quantize-pytorch, and the plain fp32 matmul x @ codebook^T of the same
shape that bounds the code search (the distances alone, no argmin, no update).

    python -m benchmarks.vq            # all configurations, writes benchmarks/results/
    python -m benchmarks.vq --quick    # the small ones only

Every measurement runs in a fresh subprocess (peak RSS on CPU, peak allocated on CUDA); the time
is the median of several steps after one warm-up step.
"""

from __future__ import annotations

import sys

from benchmarks.common import PEER, bench_main, matrix_gib, time_steps

NAME = "vq"
TITLE = "VectorQuantize / ResidualVQ training step (forward + backward + EMA)"
KEYS = ["layer", "dim", "codebook_size", "tokens", "num_quantizers"]
CONFIGS = [  # (layer, dim, codebook_size, tokens, num_quantizers)
    ("VectorQuantize", 256, 1024, 16384, 1),
    ("VectorQuantize", 256, 8192, 16384, 1),
    ("VectorQuantize", 256, 65536, 16384, 1),
    ("ResidualVQ", 256, 1024, 16384, 8),
]
IMPLS = ["vq_layers", PEER, "matmul bound"]
NOTE = ("(× = that implementation's time or added peak memory over vq_layers'; > 1 means vq_layers is "
        "faster or leaner. The matmul bound computes the distances' matmul only: < 1 is expected.)")


def peer_gib(layer: str, dim: int, codebook_size: int, tokens: int, num_quantizers: int) -> float:
    """The peer materializes (tokens x codes) fp32 several times over (distances, one-hot), per stage."""
    return matrix_gib(tokens, codebook_size)


def matmul_bound(dim: int, codebook_size: int, stages: int, device: str):
    """The step that bounds the search: one fp32 matmul x @ codebook^T per stage."""
    import torch

    codebook = torch.randn(codebook_size, dim, device=device)

    def step(x):
        for _ in range(stages):
            x.detach().reshape(-1, dim) @ codebook.t()
    return step


def training_step(module, **forward_kwargs):
    """forward + backward of (out, indices, loss) = module(x) on a reconstruction-like loss."""
    def step(x):
        out, _, loss = module(x, **forward_kwargs)
        (out.square().mean() + loss.sum()).backward()
    return step


def step_fn(impl: str, layer: str, dim: int, codebook_size: int, num_quantizers: int, device: str):
    if impl == "matmul bound":
        return matmul_bound(dim, codebook_size, num_quantizers, device)
    package = __import__("vq_layers" if impl == "vq_layers" else "vector_quantize_pytorch")
    kwargs = {"dim": dim, "codebook_size": codebook_size}
    if layer == "ResidualVQ":
        kwargs["num_quantizers"] = num_quantizers
    return training_step(getattr(package, layer)(**kwargs).to(device).train())


def measure_step(step, dim: int, tokens: int, repeats: int, device: str) -> dict:
    """Times `step` on a seeded (16, tokens / 16, dim) input that wants gradients."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(16, tokens // 16, dim, device=device, requires_grad=True)
    return time_steps(step, x, repeats, device)


def measure_one(layer: str, dim: int, codebook_size: int, tokens: int, num_quantizers: int, impl: str,
                repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    return measure_step(step_fn(impl, layer, dim, codebook_size, num_quantizers, device), dim, tokens, repeats, device)


def columns(first: str) -> list:
    """The table's leading columns: `first` (× stages when more than one), dim, codes, tokens."""
    return [
        (first, lambda r: r[first] + (f" × {r['num_quantizers']}" if r["num_quantizers"] > 1 else "")),
        ("dim", lambda r: str(r["dim"])),
        ("codes", lambda r: str(r["codebook_size"])),
        ("tokens", lambda r: str(r["tokens"])),
    ]


COLUMNS = columns("layer")


def main() -> None:
    bench_main(sys.modules[__name__], "only configurations up to 1024 codes", 900,
               quick=lambda layer, dim, codebook_size, tokens, num_quantizers: codebook_size <= 1024)


if __name__ == "__main__":
    main()
