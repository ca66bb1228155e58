"""Nearest-code search without the N x K distance matrix: the pure-torch reference, and the
dispatch to its Triton kernel (triton_nearest_code.py) behind one torch.library op.

x (h, n, d) against codebooks (h, k, d) — or x (n, d) against one codebook (k, d) — in fp32:
squared L2 (argmin ||x - c||^2) or dot product (argmax x . c, for cosine codebooks on
normalized inputs), optionally Gumbel-max sampling at a temperature. "euclidean" finds the
same nearest code as "l2" but samples from softmax(-||x - c|| / t), the distance
vector-quantize-pytorch samples with. Rows and codes go in
tiles of at most TILE_ELEMENTS scores with a running best across code tiles, so memory is
O(n + k) plus one tile. Ties go to the lowest index, as torch.argmin.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..precision import fp32_island
from . import self_check
from .backend import check_backend, run, sync_free

# at most this many (row, code) scores exist at once: 16 MiB of fp32
TILE_ELEMENTS = 2**22
METRICS = ("l2", "euclidean", "dot")
PRECISIONS = ("ieee", "tf32x3", "tf32")  # of the Triton kernel's products


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 matmuls (allowed globally by many training scripts) would pick wrong codes.

    Uses torch's newer `fp32_precision` setting where it exists: touching the legacy
    `allow_tf32` after a script used the new one raises ("mix of the legacy and new APIs").
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    name, ieee = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, name)
    setattr(matmul, name, ieee)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _gumbel(shape, generator, device) -> Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


def _check_options(metric: str, temperature: float) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature: expected >= 0, got {temperature}")


def _check(x: Tensor, codebook: Tensor, metric: str, temperature: float) -> None:
    _check_options(metric, temperature)
    if x.ndim not in (2, 3) or codebook.ndim != x.ndim:
        raise ValueError(f"x, codebook: expected (n, d) and (k, d), or (h, n, d) and (h, k, d); "
                         f"got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.shape[-1] != codebook.shape[-1] or (x.ndim == 3 and x.shape[0] != codebook.shape[0]):
        raise ValueError(f"x, codebook: feature dims (and heads) must agree, got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[-2] == 0:
        raise ValueError("codebook: expected at least one code, got 0")
    if codebook.shape[-1] == 0:
        raise ValueError("x, codebook: expected a feature dim of at least 1, got 0")


# rows the centre is estimated from (a strided sample): enough for a median, cheap at any n
CENTRE_ROWS = 1024


def _centred(x: Tensor, codebook: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """x and codebook moved by a common centre when the rows sit far from the origin.

    ||x - c||^2 is translation invariant, but the rounding of ||c||^2 - 2 x.c scales with the
    squared norm of the codes competing for a row, which lie near the row: for data far from the
    origin compared with its spread it would pick wrong codes. The centre is estimated from the
    rows, not the codebook (codes far from every row, e.g. dead ones, never compete), robustly:
    the per-dimension median of up to CENTRE_ROWS rows, leaving out non-finite values and rows
    not `valid` (padding), so a NaN row, zero-filled padding or a few outliers cannot move it.
    It is rounded to a power-of-two grid of about the rows' spread, so the subtractions are
    exact (Sterbenz) and exact data (ties) stays exact; data around the origin is left as is.
    One centre serves a head: data in clusters far apart from each other still loses accuracy.
    """
    h, n, _ = x.shape
    if n == 0:
        return x, codebook
    stride = -(-n // CENTRE_ROWS)
    if valid is None:
        sample = x[:, ::stride]
        usable = torch.isfinite(sample)
    else:  # up to CENTRE_ROWS rows, valid ones first, spread over the batch
        on_stride = torch.arange(n, device=x.device) % stride == 0
        rows = (valid.float() * 2 + on_stride).topk(min(n, CENTRE_ROWS), dim=1).indices  # (h, m)
        sample = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        usable = torch.isfinite(sample) & valid.gather(1, rows).unsqueeze(-1)
    sample = torch.where(usable, sample, float("nan"))
    middle = sample.nanmedian(dim=1, keepdim=True).values  # (h, 1, d); NaN where no usable value
    spread = (sample - middle).square().sum(-1, keepdim=True).nanmedian(dim=1).values.sqrt()  # (h, 1)
    middle, spread = middle.nan_to_num(nan=0.0), spread.nan_to_num(nan=0.0)
    far = middle.square().sum(-1) > spread.square()
    floor = middle.abs().amax(-1) * 2.0**-40  # keeps middle / step finite when the spread is 0
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(spread, floor)))).unsqueeze(-1)
    if not torch.compiler.is_compiling() and not sync_free(x.device) and not bool(far.any()):
        return x, codebook  # (x - 0 is x): no N x d copy where a sync is free
    centre = torch.where(far.unsqueeze(-1), torch.round(middle / step) * step, 0.0)
    return x - centre, codebook - centre


def _tiling(h: int, k: int, kept: int = 0) -> tuple[int, int]:
    """(code tile, row tile) so that one tile of scores (h, rows, codes), plus `kept` running
    scores per row, stays within the budget."""
    code_tile = min(k, max(1, TILE_ELEMENTS // h))
    return code_tile, max(1, TILE_ELEMENTS // ((code_tile + kept) * h))


def _tile_cost(scaled_dots: Tensor, code_norms: Tensor | None, row_norms: Tensor | None, temperature: float,
               generator, nan_to_inf: bool = True) -> Tensor:
    """Scores of one tile (h, rows, codes) -> the cost minimized: ||c||^2 - 2 x.c (||x||^2 is common
    to a row and only adds cancellation) or -x.c; the distance itself when `row_norms` are given
    (sampling by "euclidean"); sampling minimizes cost / t - gumbel. NaN costs become +inf
    (unless `nan_to_inf` is False: the caller's min then finds them, `_tile_min`).

    `scaled_dots` is the tile's matmul against the codes scaled by -2 (by -1 without
    `code_norms`, `_scaled_codes`): -2 x.c exactly, so one add forms the cost, bit for bit as
    ||c||^2 - 2 x.c, in place (a fresh tile): each pass over a tile costs about a quarter of its
    matmul, and no second tile is allocated."""
    cost = scaled_dots.add_(code_norms) if code_norms is not None else scaled_dots
    if row_norms is not None:  # the distance itself: ||x||^2 no longer cancels out
        cost = (cost + row_norms).clamp(min=0).sqrt()
    if temperature > 0:
        cost = cost / temperature - _gumbel(cost.shape, generator, cost.device)
    return _nan_to_inf_(cost) if nan_to_inf else cost


def _nan_to_inf_(cost: Tensor) -> Tensor:
    return cost.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))  # a NaN code: never nearest


def _tile_min(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The first minimum of each row of a tile whose NaN costs were left in place: min propagates
    NaN, so a row whose minimum is NaN holds one, and only then are they made +inf and the rows
    searched again (a host sync: callers use it where that is free)."""
    best, index = cost.min(dim=-1)
    if bool(best.isnan().any()):
        best, index = _nan_to_inf_(cost).min(dim=-1)
    return best, index


def _scaled_codes(codebook: Tensor, l2: bool) -> Tensor:
    """The codes times -2 ("l2") or -1 ("dot"): a power of two, so every product and partial sum
    of a matmul against them is exactly -2 (-1) times the plain one's (but for subnormal
    products, below 1e-38, whose rounding grid does not scale)."""
    return codebook * (-2.0 if l2 else -1.0)


def _torch_search(x: Tensor, codebook: Tensor, l2: bool, euclidean: bool, temperature: float,
                  seed: int) -> Tensor:
    """The reference search: x (h, n, d), codebook (h, k, d) fp32 -> indices (h, n) int64."""
    h, n, _ = x.shape
    k = codebook.shape[1]
    code_tile, row_tile = _tiling(h, k)
    generator = torch.Generator(device=x.device).manual_seed(seed) if temperature > 0 else None
    code_norms = codebook.square().sum(-1) if l2 else None
    row_norms = x.square().sum(-1, keepdim=True) if euclidean else None
    scaled = _scaled_codes(codebook, l2)
    best = x.new_full((h, n), float("inf"))
    indices = torch.zeros((h, n), dtype=torch.long, device=x.device)
    read_back = not sync_free(x.device)  # NaN costs found by the min, not by a pass over every tile
    tile = x.new_empty((h, min(n, row_tile), code_tile))  # one buffer for every full tile
    with _ieee_fp32_matmul(x.device):
        for r in range(0, n, row_tile):
            rows = slice(r, r + row_tile)
            for c in range(0, k, code_tile):
                codes = slice(c, c + code_tile)
                part = x[:, rows], scaled[:, codes].transpose(1, 2)
                full = part[0].shape[1] == tile.shape[1] and part[1].shape[2] == tile.shape[2]
                dots = torch.bmm(*part, out=tile) if full else torch.bmm(*part)
                cost = _tile_cost(dots, None if code_norms is None else code_norms[:, None, codes],
                                  None if row_norms is None else row_norms[:, rows], temperature, generator,
                                  nan_to_inf=not read_back)
                # first minimum within the tile
                tile_best, tile_index = _tile_min(cost) if read_back else cost.min(dim=-1)
                better = tile_best < best[:, rows]  # strict: an earlier tile keeps ties
                best[:, rows] = torch.where(better, tile_best, best[:, rows])
                indices[:, rows] = torch.where(better, tile_index + c, indices[:, rows])
    return indices


def _run_search(x: Tensor, codebook: Tensor, l2: bool, euclidean: bool, temperature: float, seed: int,
                backend: str, precision: str) -> Tensor:
    def triton_search():
        from .triton_nearest_code import search
        return search(x, codebook, l2, euclidean, temperature, seed, precision)

    def check():  # the kernel's one-time self-check for this key (self_check.py)
        return self_check.check_nearest_code(x.device, x.shape[-1], l2, euclidean, temperature > 0, precision)

    return run(x.device, backend or None, triton_search,
               lambda: _torch_search(x, codebook, l2, euclidean, temperature, seed),
               (self_check.search_key(x, l2, euclidean, temperature > 0, precision), check))


# One opaque op for the search, whichever backend runs it: torch.compile(fullgraph=True) traces
# the layers through it (its fake implementation gives the shape), and the backend, the TF32
# switch and the kernel launch are decided when it runs, not when it is traced. Eager calls skip
# the op's wrapper, which would import torch._dynamo in every process (a second of import, and
# torch._dynamo in gloo workers can abort them at exit).
_search_op = torch.library.custom_op("vq_layers::nearest_code_search", _run_search, mutates_args=())


@_search_op.register_fake
def _(x, codebook, l2, euclidean, temperature, seed, backend, precision):
    return x.new_empty(x.shape[:2], dtype=torch.long)


def _search(*args) -> Tensor:
    return _search_op(*args) if torch.compiler.is_compiling() else _run_search(*args)


@fp32_island
def nearest_code(x: Tensor, codebook: Tensor, metric: str = "l2", temperature: float = 0.0,
                 generator: torch.Generator | None = None, backend: str | None = None,
                 precision: str = "ieee", valid: Tensor | None = None,
                 scores: bool = True) -> tuple[Tensor, Tensor | None]:
    """-> (indices (h, n) or (n,) int64, score of the chosen code fp32 (None with scores=False)).

    The score is ||x - c||^2 for "l2" and "euclidean", x . c for "dot", computed directly for
    the chosen code. With temperature > 0 the code is sampled: argmax of -||x - c||^2 / t
    ("l2"), -||x - c|| / t ("euclidean") or x . c / t ("dot") plus Gumbel noise seeded from
    `generator` (torch's default generator when None). `backend`: "auto", "torch" or "triton"
    (default: VQ_LAYERS_BACKEND, else "auto"); `precision` of the Triton kernel's products:
    "ieee" fp32, or "tf32x3" / "tf32" on explicit request. `valid` (n,) or (h, n) bool: the
    rows that are data; the others (padding) are searched too but do not place the centre.
    """
    _check(x, codebook, metric, temperature)
    check_backend(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    euclidean = metric == "euclidean" and temperature > 0
    l2 = metric != "dot"
    if valid is not None and (valid.dtype != torch.bool or valid.shape != x.shape[:-1]):
        raise ValueError(f"valid: expected a bool mask of shape {tuple(x.shape[:-1])}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    x, codebook, single = _as_heads(x, codebook, 2)
    valid = None if valid is None else valid.reshape(x.shape[:2])
    centred_x, centred_codebook = _centred(x, codebook, valid) if l2 else (x, codebook)
    seed = _noise_seed(temperature, generator)
    indices = _search(centred_x, centred_codebook, l2, euclidean, float(temperature), seed, backend or "", precision)
    if not scores:
        return indices[0] if single else indices, None
    chosen = torch.gather(codebook, 1, indices.unsqueeze(-1).expand(-1, -1, codebook.shape[-1]))
    score = (x - chosen).square().sum(-1) if l2 else (x * chosen).sum(-1)
    return (indices[0], score[0]) if single else (indices, score)


# the k nearest codes: the torch path only (the Triton kernel keeps a running top-1)


def _check_k(k, codes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= codes:
        raise ValueError(f"k: expected an int in [1, {codes}] (the number of codes), got {k!r}")
    return k


def _noise_seed(temperature: float, generator: torch.Generator | None) -> int:
    """A draw from the caller's generator seeds the noise, so torch.manual_seed reproduces a run."""
    if temperature == 0:
        return 0
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def _tile_k_best(cost: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of each row of a tile (h, rows, codes), ties to the lowest position, best
    first -> (costs, positions). Linear passes (topk for the k-th value, then the positions at or
    below it), not a sort of the tile: torch.topk alone leaves the order of ties unspecified."""
    k = min(k, cost.shape[-1])
    kth = cost.topk(k, dim=-1, largest=False).values.amax(-1, keepdim=True)
    below, at = cost < kth, cost == kth
    chosen = below | (at & (at.cumsum(-1) <= k - below.sum(-1, keepdim=True)))  # exactly k per row
    position = torch.arange(cost.shape[-1], device=cost.device)
    positions = torch.where(chosen, position, cost.shape[-1]).topk(k, dim=-1, largest=False).values
    chosen_cost = cost.gather(-1, positions)
    order = chosen_cost.sort(dim=-1, stable=True).indices  # positions ascend: ties keep the lowest
    return chosen_cost.gather(-1, order), positions.gather(-1, order)


def _keep_k(best: tuple[Tensor, Tensor], cost: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """Merges a tile's k best into the running k best: a stable sort of the running ones (all
    lower indices) followed by the tile's keeps ties at the lowest index."""
    tile_cost, tile_index = _tile_k_best(cost, k)
    cost, index = torch.cat([best[0], tile_cost], dim=-1), torch.cat([best[1], tile_index + offset], dim=-1)
    order = cost.sort(dim=-1, stable=True).indices[..., :k]
    return cost.gather(-1, order), index.gather(-1, order)


def _torch_search_k(x: Tensor, codebook: Tensor, l2: bool, euclidean: bool, temperature: float, seed: int,
                    k: int) -> Tensor:
    """x (h, n, d), codebook (h, c, d) fp32 -> indices (h, n, k) int64, best first."""
    h, n, _ = x.shape
    size = codebook.shape[1]
    code_tile, row_tile = _tiling(h, size, k)  # the merge holds k + code_tile per row
    generator = torch.Generator(device=x.device).manual_seed(seed) if temperature > 0 else None
    code_norms = codebook.square().sum(-1) if l2 else None
    row_norms = x.square().sum(-1, keepdim=True) if euclidean else None
    scaled = _scaled_codes(codebook, l2)
    indices = torch.zeros((h, n, k), dtype=torch.long, device=x.device)
    with _ieee_fp32_matmul(x.device):
        for r in range(0, n, row_tile):
            rows = slice(r, r + row_tile)
            best = (x.new_empty((h, x[:, rows].shape[1], 0)), indices.new_empty((h, x[:, rows].shape[1], 0)))
            for c in range(0, size, code_tile):
                codes = slice(c, c + code_tile)
                dots = torch.einsum("hnd,hkd->hnk", x[:, rows], scaled[:, codes])
                cost = _tile_cost(dots, None if code_norms is None else code_norms[:, None, codes],
                                  None if row_norms is None else row_norms[:, rows], temperature, generator)
                best = _keep_k(best, cost, c, k)
            indices[:, rows] = best[1]
    return indices


def _as_heads(x: Tensor, codebook: Tensor, codebook_ndim: int):
    """(n, d) and one codebook -> a heads axis of 1 (single=True); (h, n, d) as given."""
    single = x.ndim == 2
    if x.ndim not in (2, 3) or codebook.ndim != x.ndim + codebook_ndim - 2:
        raise ValueError(f"x, codebook: expected (n, d) or (h, n, d) with a codebook of {codebook_ndim} dims "
                         f"(one more with heads), got {tuple(x.shape)} and {tuple(codebook.shape)}")
    return (x.unsqueeze(0), codebook.unsqueeze(0), single) if single else (x, codebook, single)


@fp32_island
def nearest_codes(x: Tensor, codebook: Tensor, metric: str = "l2", k: int = 1, temperature: float = 0.0,
                  generator: torch.Generator | None = None, valid: Tensor | None = None,
                  scores: bool = True) -> tuple[Tensor, Tensor | None]:
    """The k nearest codes: -> (indices (h, n, k) or (n, k) int64, their scores fp32 (None with
    scores=False)), best first
    (ascending ||x - c||^2 for "l2"/"euclidean", descending x . c for "dot"); ties go to the lowest
    index. With temperature > 0, k codes drawn without replacement (Gumbel-top-k) from the
    distribution `nearest_code` samples from. k = 1 is `nearest_code` itself (its backend too).
    Memory: one tile of scores plus the running k best per row.
    """
    _check(x, codebook, metric, temperature)
    k = _check_k(k, codebook.shape[-2])
    if k == 1:
        indices, score = nearest_code(x, codebook, metric, temperature, generator, valid=valid, scores=scores)
        return indices.unsqueeze(-1), None if score is None else score.unsqueeze(-1)
    x, codebook, single = _as_heads(x, codebook, 2)
    if valid is not None and (valid.dtype != torch.bool or valid.shape[-1] != x.shape[1]):
        raise ValueError(f"valid: expected a bool mask of {x.shape[1]} rows, got {valid.dtype} {tuple(valid.shape)}")
    valid = None if valid is None else valid.reshape(-1, x.shape[1]).expand(x.shape[0], -1)
    l2 = metric != "dot"
    centred_x, centred_codebook = _centred(x, codebook, valid) if l2 else (x, codebook)
    indices = _torch_search_k(centred_x, centred_codebook, l2, metric == "euclidean" and temperature > 0,
                              float(temperature), _noise_seed(temperature, generator), k)
    if not scores:
        return indices[0] if single else indices, None
    score = _chosen_scores(x, codebook, indices, l2)
    return (indices[0], score[0]) if single else (indices, score)


def _chosen_scores(x: Tensor, codebook: Tensor, indices: Tensor, l2: bool) -> Tensor:
    """x (h, n, d), codebook (h, c, d), indices (h, n, k) -> ||x - c||^2 (or x . c) of the chosen
    codes (h, n, k), computed directly (no norm cancellation) in row blocks within the budget:
    never the n x k x d block of every chosen code at once (beam search asks for k = beams)."""
    h, n, k = indices.shape
    d = x.shape[-1]
    scores = x.new_empty((h, n, k))
    row_tile = max(1, TILE_ELEMENTS // (h * k * d))
    for r in range(0, n, row_tile):
        rows = slice(r, r + row_tile)
        picked = indices[:, rows]
        chosen = codebook.gather(1, picked.flatten(1).unsqueeze(-1).expand(-1, -1, d)).reshape(*picked.shape, d)
        xs = x[:, rows].unsqueeze(2)
        scores[:, rows] = (xs - chosen).square().sum(-1) if l2 else (xs * chosen).sum(-1)
    return scores


@fp32_island
def nearest_codes_per_token(x: Tensor, codebooks: Tensor, metric: str = "l2", k: int = 1,
                            temperature: float = 0.0,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Search against one codebook per row (an implicit neural codebook): x (h, n, d) or (n, d),
    codebooks (h, n, c, d) or (n, c, d) -> (indices (h, n, k) or (n, k) int64, scores fp32), best
    first, as `nearest_codes`. The codebooks are inherently n x c x d; the search adds at most one
    budget-sized block (rows of direct differences x - c, exact: no norm cancellation).
    """
    _check_options(metric, temperature)
    x, codebooks, single = _as_heads(x, codebooks, 3)
    h, n, d = x.shape
    if codebooks.shape[:2] != (h, n) or codebooks.shape[-1] != d or codebooks.shape[2] == 0:
        raise ValueError(f"codebooks: expected ({h}, {n}, codes >= 1, {d}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(codebooks.shape)}")
    size = codebooks.shape[2]
    k = _check_k(k, size)
    seed = _noise_seed(temperature, generator)
    noise = torch.Generator(device=x.device).manual_seed(seed) if temperature > 0 else None
    row_tile = max(1, TILE_ELEMENTS // (h * size * max(d, 1)))
    indices = torch.zeros((h, n, k), dtype=torch.long, device=x.device)
    scores = x.new_zeros((h, n, k))
    for r in range(0, n, row_tile):
        rows = slice(r, r + row_tile)
        if metric == "dot":
            score = torch.einsum("hnd,hncd->hnc", x[:, rows], codebooks[:, rows])
            cost = -score
        else:
            score = (x[:, rows].unsqueeze(2) - codebooks[:, rows]).square().sum(-1)
            cost = score.sqrt() if metric == "euclidean" and temperature > 0 else score
        if temperature > 0:
            cost = cost / temperature - _gumbel(cost.shape, noise, x.device)
        cost = cost.masked_fill(cost.isnan(), float("inf"))
        order = _tile_k_best(cost, k)[1]
        indices[:, rows], scores[:, rows] = order, score.gather(-1, order)
    return (indices[0], scores[0]) if single else (indices, scores)
