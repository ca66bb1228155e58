"""The peer-surface extras, one training step (forward + backward) side by side: vq_layers vs
vector-quantize-pytorch, and the plain fp32 matmul x @ codebook^T per stage that bounds the code
search.

    python -m benchmarks.extras            # all configurations, writes benchmarks/results/
    python -m benchmarks.extras --quick    # the small ones only

- VectorQuantize `topk=8`: the 8 nearest codes per token (the peer takes topk of its dense
  (tokens x codes) distances; ours merges a running k-best over tiles);
- ResidualVQ beam search (`beam_size=4`): the peer runs topk with gradients on every beam at
  every stage; ours searches the path in fp32 first and quantizes along it;
- ResidualVQ `implicit_neural_codebook` (QINCo): per-token codebooks are inherently
  (tokens x codes x dim) for both; the peer also concatenates (tokens x codes x 2 dim);
- SimVQ: the peer's dense distances against ours in tiles.

Every measurement runs in a fresh subprocess (peak RSS on CPU, peak allocated on CUDA); the time
is the median of several steps after one warm-up step.
"""

from __future__ import annotations

import sys

from benchmarks.common import PEER, bench_main, matrix_gib
from benchmarks.vq import columns, matmul_bound, measure_step, training_step

NAME = "extras"
TITLE = "The peer-surface extras: one training step (forward + backward)"
KEYS = ["feature", "dim", "codebook_size", "tokens", "num_quantizers"]
CONFIGS = [  # (feature, dim, codebook_size, tokens, num_quantizers)
    ("VectorQuantize topk=8", 256, 8192, 4096, 1),
    ("ResidualVQ beam_size=4", 256, 1024, 4096, 4),
    ("ResidualVQ implicit_neural_codebook", 64, 256, 1024, 4),
    ("SimVQ", 256, 8192, 4096, 1),
]
IMPLS = ["vq_layers", PEER, "matmul bound"]
NOTE = ("(× = that implementation's time or added peak memory over vq_layers'; > 1 means vq_layers is "
        "faster or leaner. The matmul bound computes one distances' matmul per stage only: < 1 is expected; "
        "per-token codebooks (QINCo) cost far more than it by nature.)")


def peer_gib(feature: str, dim: int, codebook_size: int, tokens: int, num_quantizers: int) -> float:
    """The peer materializes (tokens x codes) fp32 several times over; QINCo (tokens x codes x 2 dim)."""
    if "implicit" in feature:
        return tokens * codebook_size * 2 * dim * 4 * num_quantizers / 2**30
    beams = 4 if "beam" in feature else 1
    return matrix_gib(tokens * beams, codebook_size)


def layer_for(package, feature: str, dim: int, codebook_size: int, num_quantizers: int):
    if feature.startswith("VectorQuantize"):
        return package.VectorQuantize(dim=dim, codebook_size=codebook_size), {"topk": 8}
    if feature == "SimVQ":
        return package.SimVQ(dim=dim, codebook_size=codebook_size), {}
    kwargs = {"dim": dim, "codebook_size": codebook_size, "num_quantizers": num_quantizers}
    if "beam" in feature:
        kwargs["beam_size"] = 4
    else:
        kwargs["implicit_neural_codebook"] = True
    return package.ResidualVQ(**kwargs), {}


def step_fn(impl: str, feature: str, dim: int, codebook_size: int, num_quantizers: int, device: str):
    if impl == "matmul bound":
        return matmul_bound(dim, codebook_size, num_quantizers, device)
    package = __import__("vq_layers" if impl == "vq_layers" else "vector_quantize_pytorch")
    module, forward_kwargs = layer_for(package, feature, dim, codebook_size, num_quantizers)
    return training_step(module.to(device).train(), **forward_kwargs)


def measure_one(feature: str, dim: int, codebook_size: int, tokens: int, num_quantizers: int, impl: str,
                repeats: int, device: str) -> dict:
    """Runs inside the subprocess."""
    return measure_step(step_fn(impl, feature, dim, codebook_size, num_quantizers, device), dim, tokens, repeats,
                        device)


COLUMNS = columns("feature")


def main() -> None:
    bench_main(sys.modules[__name__], "only configurations up to 1024 codes", 900,
               quick=lambda feature, dim, codebook_size, tokens, num_quantizers: codebook_size <= 1024)


if __name__ == "__main__":
    main()
