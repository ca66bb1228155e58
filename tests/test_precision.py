"""The precision core: fp32 island, projection rule, fp32 statistics buffers."""

import pytest
import torch
from torch import nn

from vq_layers.precision import (
    Fp32BuffersModule,
    autocast_device_types,
    cat,
    fp32_buffers,
    fp32_island,
    project,
    restore_dtype,
)


@fp32_island
def island_matmul(a, b):
    return a @ b, a.dtype, torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_island_turns_cpu_autocast_off(autocast_dtype):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=autocast_dtype):
        assert (a @ b).dtype == autocast_dtype  # outside: autocast applies
        out, seen_dtype, autocast_inside = island_matmul(a, b)
        assert out.dtype == torch.float32 and seen_dtype == torch.float32
        assert not autocast_inside
        assert torch.is_autocast_enabled("cpu")  # restored after the island
        assert (a @ b).dtype == autocast_dtype
    torch.testing.assert_close(out, a @ b)


def test_island_upcasts_arguments_and_leaves_others_alone():
    @fp32_island
    def dtypes(x, n, *, y, name):
        return x.dtype, n.dtype, y.dtype, name

    x, n, y = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.long), torch.ones(2).half()
    assert dtypes(x, n, y=y, name="a") == (torch.float32, torch.long, torch.float32, "a")


def test_island_is_exact_where_bf16_would_not_be():
    # 256 + 1 is not representable in bf16: the island must compute it in fp32
    a = torch.full((1, 1), 256.0)
    b = torch.full((1, 1), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b + b @ b).item() == 256.0  # bf16 rounds 257 away
        out = fp32_island(lambda x, y: x @ y + y @ y)(a, b)
    assert out.item() == 257.0 and out.dtype == torch.float32


def test_autocast_device_types():
    assert autocast_device_types() == []
    assert autocast_device_types(torch.ones(1)) == ["cpu"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_device_types() == ["cpu"]


def test_restore_dtype():
    out = restore_dtype((torch.ones(2), torch.ones(2, dtype=torch.long), None), torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.long and out[2] is None


def test_island_compiles_fullgraph():
    fn = torch.compile(lambda a, b: island_matmul(a, b)[0], fullgraph=True, backend="aot_eager")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(a, b).dtype == torch.float32


def test_cat_of_bf16_under_fp16_autocast():
    parts = [torch.ones(2, dtype=torch.bfloat16)] * 2
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(RuntimeError):  # the torch behaviour `cat` exists for
            torch.cat(parts)
        assert cat(parts).dtype == torch.bfloat16


# --- projection rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_projection_without_autocast_casts_input_to_weight(weight_dtype, input_dtype):
    linear = nn.Linear(4, 3).to(weight_dtype)
    x = torch.randn(2, 4).to(input_dtype)
    out = project(linear, x)
    assert out.dtype == weight_dtype
    torch.testing.assert_close(out, linear(x.to(weight_dtype)))


def test_projection_follows_autocast():
    linear = nn.Linear(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert project(linear, torch.randn(2, 4).half()).dtype == torch.bfloat16
    x = torch.randn(2, 4)
    assert project(nn.Identity(), x) is x


# --- fp32 statistics buffers --------------------------------------------------------------------


class Stats(Fp32BuffersModule):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))
        self.register_fp32_buffer("ema", torch.tensor([1e-8, 70000.0, 1.0 + 2**-20]))
        self.register_buffer("plain", torch.ones(3))
        self.child = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.float16),
        lambda m: m.to(dtype=torch.bfloat16),
        lambda m: m.double(),
        lambda m: m.to("cpu", torch.float16),
    ],
    ids=["half", "bfloat16", "to-fp16", "to-dtype-bf16", "double", "to-device-dtype"],
)
def test_statistics_buffers_stay_fp32_and_exact(convert):
    module = Stats()
    before = module.ema.clone()
    converted = convert(module)
    assert converted is module
    assert module.ema.dtype == torch.float32 and torch.equal(module.ema, before)
    assert module.plain.dtype != torch.float32 and module.weight.dtype != torch.float32
    assert module.child.weight.dtype == module.weight.dtype
    assert dict(fp32_buffers(module)).keys() == {"ema"}


def test_statistics_buffers_follow_device_moves():
    module = Stats().to("meta")
    assert module.ema.device.type == "meta" and module.ema.dtype == torch.float32
    module = module.to_empty(device="cpu")
    assert module.ema.device.type == "cpu" and module.ema.dtype == torch.float32


def test_statistics_buffers_under_low_precision_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what `torch_dtype=` loaders do during __init__
    try:
        module = Stats()
    finally:
        torch.set_default_dtype(previous)
    assert module.ema.dtype == torch.float32 and module.weight.dtype == torch.bfloat16


def test_statistics_buffers_state_dict_round_trip():
    source = Stats()
    target = Stats().half()
    target.load_state_dict(source.half().state_dict())
    assert target.ema.dtype == torch.float32 and torch.equal(target.ema, Stats().ema)
    nested = nn.Sequential(Stats()).half()
    assert dict(fp32_buffers(nested)) and all(b.dtype == torch.float32 for _, b in fp32_buffers(nested))


def _cast_like_fsdp1(module: nn.Module, dtype: torch.dtype) -> None:
    """FSDP1's MixedPrecision(buffer_dtype=...) assigns `buffer.data`, going around `_apply`."""
    for buf in module.buffers():
        if buf.is_floating_point():
            buf.data = buf.to(dtype)


def test_cast_around_apply_is_undone_before_the_next_call():
    class Called(Stats):
        def forward(self, x):
            return x * self.ema

    module = Called()
    ema = module.ema  # wrappers (DDP) hold the buffer objects: they must stay the same ones
    _cast_like_fsdp1(module, torch.bfloat16)
    with pytest.warns(UserWarning, match=r"Called\.ema: .*bfloat16.*buffer_dtype"):
        module(torch.ones(3))
    assert module.ema is ema and ema.dtype == torch.float32
    # the values were rounded once (what the warning says), no more
    expected = torch.tensor([1e-8, 70000.0, 1.0 + 2**-20]).bfloat16().float()
    assert torch.equal(ema, expected)
    assert module.plain.dtype == torch.bfloat16  # only the registered statistics are restored


def test_vq_statistics_stay_fp32_when_a_wrapper_casts_them():
    from vq_layers import VectorQuantize

    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.5).train()
    _cast_like_fsdp1(vq, torch.bfloat16)
    # the reference: the same rounded values, in float32 buffers from the start
    reference = VectorQuantize(dim=4, codebook_size=8, decay=0.5).train()
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in vq.state_dict().items()})
    x = torch.randn(2, 16, 4)
    with pytest.warns(UserWarning, match="restored to float32"):
        vq(x)
    reference(x)
    for name, buf in vq._codebook.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
        assert torch.equal(buf, reference._codebook.get_buffer(name)), name


@pytest.mark.parametrize("name", ["VectorQuantize", "ResidualVQ", "LFQ", "ResidualLFQ"])
def test_nan_in_masked_padding_reaches_no_gradient(name):
    """Padding is zeroed before the input projection: a NaN there would otherwise make the
    projection's weight gradient NaN (0 * NaN), though every output row is finite."""
    import vq_layers

    kwargs = dict(dim=16, codebook_size=2**4)
    if name == "VectorQuantize":
        kwargs["codebook_dim"] = 4
    elif name == "ResidualVQ":
        kwargs.update(codebook_dim=4, num_quantizers=2)
    elif name == "ResidualLFQ":
        kwargs["num_quantizers"] = 2
    layer = getattr(vq_layers, name)(**kwargs).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    x[1, 5] = float("nan")
    x.requires_grad_()
    out = layer(x, mask=mask)
    loss = out[0][mask].square().sum() + sum(t.sum() for t in out[2:] if isinstance(t, torch.Tensor))
    loss.backward()
    assert torch.isfinite(layer.project_in.weight.grad).all()
    assert torch.isfinite(x.grad[mask]).all()
