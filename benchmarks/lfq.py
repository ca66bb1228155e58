"""One LFQ training step (forward + backward) side by side: vq_layers vs vector-quantize-pytorch,
and the sign-only straight-through step that bounds the work (no entropy at all).

    python -m benchmarks.lfq            # all configurations, writes benchmarks/results/
    python -m benchmarks.lfq --quick    # the small ones only

Every measurement runs in a fresh subprocess, so its peak RSS (CPU) or peak allocated memory
(CUDA) is its own; the time is the median of several steps after one warm-up step.
"""

from __future__ import annotations

from benchmarks.common import (
    benchmark_cli,
    describe_machine,
    markdown_table,
    results_path,
    run_isolated,
    time_steps,
    write_results,
)

CONFIGS = [  # (codebook_size, tokens, inv_temperature)
    (2**14, 4096, 100.0),
    (2**16, 4096, 100.0),
    (2**16, 4096, 1.0),
    (2**18, 16384, 100.0),
]
IMPLS = ["vq_layers", "vector-quantize-pytorch", "sign-only bound"]
# the peer materializes (tokens x codes) fp32 several times over: skip what cannot fit
PEER_MAX_PAIRS = 2**28


def make_layer(impl: str, codebook_size: int):
    if impl == "vq_layers":
        from vq_layers import LFQ
    else:
        from vector_quantize_pytorch import LFQ
    return LFQ(codebook_size=codebook_size, entropy_loss_weight=0.1, diversity_gamma=1.0)


def step_fn(impl: str, codebook_size: int, inv_temperature: float):
    import torch

    if impl == "sign-only bound":
        def step(x):
            codes = torch.where(x > 0, 1.0, -1.0)
            out = x + (codes - x).detach()
            out.square().mean().backward()
        return step
    layer = make_layer(impl, codebook_size).train()

    def step(x):
        out, _, aux_loss = layer(x, inv_temperature=inv_temperature)
        (out.square().mean() + aux_loss).backward()
    return step


def measure_one(impl: str, codebook_size: int, tokens: int, inv_temperature: float, repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    import torch

    d = codebook_size.bit_length() - 1
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d, device=device, requires_grad=True)
    step = step_fn(impl, codebook_size, inv_temperature)
    return time_steps(step, x, repeats, device)


COLUMNS = [
    ("codes", lambda r: f"2^{r['codebook_size'].bit_length() - 1}"),
    ("tokens", lambda r: str(r["tokens"])),
    ("inv_temperature", lambda r: f"{r['inv_temperature']:g}"),
]


def main() -> None:
    args = benchmark_cli(__doc__, "only configurations under 2^16 x 4096", 600, COLUMNS, IMPLS, measure_one)
    if args is None:
        return

    rows = []
    for codebook_size, tokens, inv_temperature in CONFIGS:
        if args.quick and codebook_size * tokens > 2**26:
            continue
        row = {"codebook_size": codebook_size, "tokens": tokens, "inv_temperature": inv_temperature}
        for impl in IMPLS:
            if impl == "vector-quantize-pytorch" and codebook_size * tokens > PEER_MAX_PAIRS:
                row[impl] = {"error": "not run: needs the tokens x codes matrix many times over"}
                continue
            row[impl] = run_isolated("benchmarks.lfq", [impl, codebook_size, tokens, inv_temperature], args.repeats,
                                     args.device, args.timeout)
            print(codebook_size, tokens, inv_temperature, impl, row[impl], flush=True)
        rows.append(row)

    machine = describe_machine(args.device)
    table = markdown_table(rows, COLUMNS, IMPLS, reference="vq_layers")
    table += "\n\n(× = that implementation's time or added peak RSS over vq_layers'; > 1 means vq_layers is faster or leaner)"
    path = results_path("lfq", args.device)
    write_results(path, {"benchmark": "LFQ training step (forward + backward)", "machine": machine, "rows": rows}, table)
    print(table)
    print(f"written: {path}.json, {path}.md")


if __name__ == "__main__":
    main()
