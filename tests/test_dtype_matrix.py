"""The harness itself: each check fires on a layer that breaks exactly that rule."""

import pytest
import torch
from torch import nn

from dtype_matrix import CPU_AUTOCASTS, Cell, dtype_matrix, run_cell, run_non_finite_cell
from vq_layers.non_finite import mark_losses, mark_non_finite, non_finite_tokens
from vq_layers.precision import Fp32BuffersModule, fp32_island, project


class GoodLayer(Fp32BuffersModule):
    """A minimal well-behaved quantizer: nearest of 4 codes, fp32 island, ST estimator."""

    def __init__(self, flaw=None):
        super().__init__()
        self.flaw = flaw
        self.proj = nn.Linear(4, 4)
        self.codebook = nn.Parameter(torch.randn(4, 4))
        self.register_fp32_buffer("counts", torch.zeros(4))

    @fp32_island
    def quantize(self, x, codebook):
        indices = torch.cdist(x, codebook).argmin(-1)
        self.counts += torch.bincount(indices, minlength=4).float()
        codes = codebook[indices]
        return x + (codes - x).detach(), indices, (codes.detach() - x).square().mean()

    def forward(self, x):
        tokens = project(self.proj, x)
        quantized, indices, loss = self.quantize(tokens.reshape(-1, 4), self.codebook)
        out = quantized.reshape(x.shape).to(x.dtype)
        if self.flaw == "output_dtype":
            out = out.float()
        if self.flaw == "nan":
            out = out * float("nan")
        if self.flaw == "int32":
            indices = indices.int()
        if self.flaw == "loss_dtype":
            loss = loss.to(x.dtype)
        if self.flaw == "fp64":
            loss = loss.double().float()
        if self.flaw == "buffer":
            self._buffers["counts"] = self.counts.half()
        if self.flaw == "no_grad":
            out = out.detach()
        return out, indices, loss


def make_input(dtype):
    return torch.randn(2, 3, 4, dtype=dtype)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_good_layer_passes_every_cell(cell):
    result = run_cell(cell, GoodLayer, make_input)
    assert result.parts.output.shape == (2, 3, 4)
    assert len(result.parts.indices) == 1 and len(result.parts.losses) == 1


FLAWED_CELLS = {
    "output_dtype": Cell("fp32", "bf16", "off", False),
    "nan": Cell("fp32", "fp32", "off", False),
    "int32": Cell("fp32", "fp32", "off", False),
    "loss_dtype": Cell("fp32", "bf16", "off", False),
    "fp64": Cell("fp32", "fp32", "off", False),
    "buffer": Cell("fp32", "fp32", "off", False),
    "no_grad": Cell("fp32", "fp32", "off", True),
}


@pytest.mark.parametrize("flaw", FLAWED_CELLS)
def test_each_flaw_is_caught(flaw):
    with pytest.raises(AssertionError):
        run_cell(FLAWED_CELLS[flaw], lambda: GoodLayer(flaw), make_input)


def test_half_cast_buffer_is_caught():
    class Careless(GoodLayer):
        def _apply(self, fn, recurse=True):  # skips the fp32 guard
            return nn.Module._apply(self, fn, recurse)

    with pytest.raises(AssertionError, match="statistics buffer"):
        run_cell(Cell("fp16", "fp32", "off", False), Careless, make_input)


def test_autocast_leak_is_caught():
    """A layer that computes its distances under autocast picks different codes or dtypes."""

    class Leaky(GoodLayer):
        def forward(self, x):
            out = (x @ self.proj.weight.t()).to(torch.float32)  # bf16 under autocast, then up
            return out, torch.zeros(1, dtype=torch.long)

    with pytest.raises(AssertionError, match="output dtype"):
        run_cell(Cell("fp32", "fp16", "cpu-bf16", False), Leaky, make_input)


# --- the non-finite rule (docs/precision.md) ---------------------------------------------------------

BAD = torch.tensor([[False, True, False], [False, False, False]])  # token (0, 1) of make_input's (2, 3, 4)


class MarkingLayer(GoodLayer):
    """GoodLayer following the non-finite rule with the library's helpers, or breaking one part."""

    def forward(self, x):
        bad = non_finite_tokens(x)
        out, indices, loss = super().forward(x)
        indices = indices.reshape(x.shape[:2])
        out = mark_non_finite(out, bad)
        if self.flaw == "finite_output":  # a code for it, as an argmin over NaN distances gives
            out = out.nan_to_num(0.0)
        if self.flaw == "nan_elsewhere":
            out = mark_non_finite(out, torch.ones_like(bad))
        if self.flaw != "index_kept":
            indices = mark_non_finite(indices, bad)
        if self.flaw == "index_elsewhere":
            indices = mark_non_finite(indices, ~bad)
        loss = mark_losses(loss, bad)
        if self.flaw == "finite_loss":
            loss = loss.nan_to_num(0.0)
        return out, indices, loss


def non_finite_input(dtype):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    x[0, 1, 2] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("cell", dtype_matrix(autocasts=CPU_AUTOCASTS))
def test_marking_layer_passes_every_non_finite_cell(cell):
    result = run_non_finite_cell(cell, MarkingLayer, non_finite_input, BAD)
    assert result.parts.output.shape == (2, 3, 4) and result.parts.indices[0].shape == (2, 3)


@pytest.mark.parametrize("flaw", ["finite_output", "nan_elsewhere", "index_kept", "index_elsewhere", "finite_loss",
                                  "output_dtype", "int32", "fp64", "buffer"])
def test_each_non_finite_flaw_is_caught(flaw):
    with pytest.raises(AssertionError):
        run_non_finite_cell(Cell("fp32", "bf16", "off", False), lambda: MarkingLayer(flaw), non_finite_input, BAD)


def test_non_finite_cells_are_cpu_only_and_cover_every_dtype_mix():
    cells = [param.values[0] for param in dtype_matrix(autocasts=CPU_AUTOCASTS)]
    assert len(cells) == 3 * 3 * 3 * 2 and {cell.device for cell in cells} == {"cpu"}
