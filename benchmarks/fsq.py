"""One FSQ training step (forward + backward) side by side: vq_layers vs vector-quantize-pytorch,
both given the FSQ paper's levels for the codebook size (`vq_layers.FSQ.levels_for`), and the
projections-only step that bounds the work (project_in then project_out, no quantization).

    python -m benchmarks.fsq            # 2^10 .. 2^16 codes, dim 256, 16384 tokens
    python -m benchmarks.fsq --quick    # up to 2^12 codes

Every measurement runs in a fresh subprocess (peak RSS on CPU, peak allocated on CUDA); the time
is the median of several steps after one warm-up step.
"""

from __future__ import annotations

import sys

from benchmarks.common import PEER, bench_main, time_steps

NAME = "fsq"
TITLE = "FSQ training step (forward + backward)"
KEYS = ["codebook_size", "levels", "dim", "tokens"]
SIZES = [2**10, 2**12, 2**14, 2**16]
IMPLS = ["vq_layers", PEER, "projections-only bound"]
NOTE = ("(× = that implementation's time or added peak memory over vq_layers'; > 1 means vq_layers is "
        "faster or leaner. The bound runs FSQ's two projections (dim → len(levels) → dim) with no "
        "quantization between them: < 1 is expected.)")


def config(codebook_size: int, dim: int = 256, tokens: int = 16384) -> tuple:
    """(codebook_size, levels, dim, tokens), levels from the FSQ paper via vq_layers.FSQ.levels_for;
    both libraries get these levels."""
    from vq_layers import FSQ

    return codebook_size, FSQ.levels_for(codebook_size), dim, tokens


def __getattr__(name: str):
    # CONFIGS is computed on first use, so the measuring subprocesses (the peer's included) never
    # import vq_layers just to read the levels
    if name == "CONFIGS":
        return [config(size) for size in SIZES]
    raise AttributeError(name)


def peer_gib(codebook_size: int, levels: list, dim: int, tokens: int) -> None:
    """FSQ has no (tokens x codes) tensor in either library: the peer always runs."""
    return None


def step_fn(impl: str, levels: list, dim: int, device: str):
    import torch

    if impl == "projections-only bound":
        project_in = torch.nn.Linear(dim, len(levels)).to(device)
        project_out = torch.nn.Linear(len(levels), dim).to(device)

        def bound_step(x):
            project_out(project_in(x)).square().mean().backward()
        return bound_step
    if impl == "vq_layers":
        from vq_layers import FSQ
    else:
        from vector_quantize_pytorch import FSQ
    layer = FSQ(levels=list(levels), dim=dim).to(device).train()

    def step(x):
        out, _ = layer(x)
        out.square().mean().backward()
    return step


def measure_one(codebook_size: int, levels: list, dim: int, tokens: int, impl: str, repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(16, tokens // 16, dim, device=device, requires_grad=True)
    return time_steps(step_fn(impl, levels, dim, device), x, repeats, device)


COLUMNS = [
    ("codes", lambda r: f"2^{r['codebook_size'].bit_length() - 1}"),
    ("levels", lambda r: "×".join(map(str, r["levels"]))),
    ("dim", lambda r: str(r["dim"])),
    ("tokens", lambda r: str(r["tokens"])),
]


def main() -> None:
    bench_main(sys.modules[__name__], "only configurations up to 2^12 codes", 600,
               quick=lambda codebook_size, levels, dim, tokens: codebook_size <= 2**12)


if __name__ == "__main__":
    main()
