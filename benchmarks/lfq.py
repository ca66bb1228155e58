"""One LFQ training step (forward + backward) side by side: vq_layers vs vector-quantize-pytorch,
and the sign-only straight-through step that bounds the work (no entropy at all).

    python -m benchmarks.lfq            # all configurations, writes benchmarks/results/
    python -m benchmarks.lfq --quick    # the small ones only

Every measurement runs in a fresh subprocess, so its peak RSS (CPU) or peak allocated memory
(CUDA) is its own; the time is the median of several steps after one warm-up step.
"""

from __future__ import annotations

import sys

from benchmarks.common import PEER, bench_main, matrix_gib, time_steps

NAME = "lfq"
TITLE = "LFQ training step (forward + backward)"
KEYS = ["codebook_size", "tokens", "inv_temperature"]
CONFIGS = [  # (codebook_size, tokens, inv_temperature)
    (2**14, 4096, 100.0),
    (2**16, 4096, 100.0),
    (2**16, 4096, 1.0),
    (2**18, 16384, 100.0),
]
IMPLS = ["vq_layers", PEER, "sign-only bound"]
NOTE = "(× = that implementation's time or added peak memory over vq_layers'; > 1 means vq_layers is faster or leaner)"


def peer_gib(codebook_size: int, tokens: int, inv_temperature: float) -> float:
    """The peer materializes (tokens x codes) fp32 several times over."""
    return matrix_gib(tokens, codebook_size)


def step_fn(impl: str, codebook_size: int, inv_temperature: float, device: str):
    import torch

    if impl == "sign-only bound":
        def step(x):
            codes = torch.where(x > 0, 1.0, -1.0)
            out = x + (codes - x).detach()
            out.square().mean().backward()
        return step
    if impl == "vq_layers":
        from vq_layers import LFQ
    else:
        from vector_quantize_pytorch import LFQ
    layer = LFQ(codebook_size=codebook_size, entropy_loss_weight=0.1, diversity_gamma=1.0).to(device).train()

    def step(x):
        out, _, aux_loss = layer(x, inv_temperature=inv_temperature)
        (out.square().mean() + aux_loss).backward()
    return step


def measure_one(codebook_size: int, tokens: int, inv_temperature: float, impl: str, repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    import torch

    d = codebook_size.bit_length() - 1
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d, device=device, requires_grad=True)
    return time_steps(step_fn(impl, codebook_size, inv_temperature, device), x, repeats, device)


COLUMNS = [
    ("codes", lambda r: f"2^{r['codebook_size'].bit_length() - 1}"),
    ("tokens", lambda r: str(r["tokens"])),
    ("inv_temperature", lambda r: f"{r['inv_temperature']:g}"),
]


def main() -> None:
    bench_main(sys.modules[__name__], "only configurations up to 2^14 x 4096", 600,
               quick=lambda codebook_size, tokens, inv_temperature: codebook_size * tokens <= 2**26)


if __name__ == "__main__":
    main()
