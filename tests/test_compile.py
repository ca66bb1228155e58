"""torch.compile with the default backend (inductor) and fullgraph=True equals eager, for every
public layer's training step: from the same state, over several steps, the indices are equal,
outputs, losses and buffers equal to float rounding (inductor fuses and reorders float ops),
and input and parameter gradients within 1e-5 of the largest.

Inductor once recomputed, in the backward, reads of a codebook that the step had updated in
place: gradients came out 10-900% wrong (compiling.snapshot). Random draws (dead-code rows,
noise) come from the eager generator here (`fallback_random`): with inductor's own generator
they are other numbers of the same distribution.

Inductor compiles take seconds each on 2 cores: CI runs CI_CONFIGS, one per update mechanism;
`pytest -m compile_sweep tests/test_compile.py` runs every configuration.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reference import randn
from vq_layers import (
    FSP,
    FSQ,
    LFQ,
    BinaryMapper,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    HierarchicalVQ,
    LatentQuantize,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)
from vq_reference import assert_buffers_equal, buffers

GRAD_RTOL = 1e-5


def tensors_of(result):
    """The tensors of a forward's (nested) return value, in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for part in result for t in tensors_of(part)]
    return []


def train_step(layer, x, kwargs, step):
    """One forward + backward -> (the forward's tensors detached, x.grad, {parameter: grad})."""
    module = getattr(layer, "_orig_mod", layer)
    torch.manual_seed(1000 + step)  # random draws alike in both runs
    x = x.clone().requires_grad_(x.is_floating_point())
    result = tensors_of(layer(x, **kwargs))
    loss = sum((t.float().square().mean() for t in result if t.requires_grad), torch.zeros(()))
    if loss.requires_grad:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return [t.detach() for t in result], x.grad, grads


def assert_grads_close(got, want, what):
    if want is None:
        assert got is None, what
        return
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    assert error <= GRAD_RTOL * scale + 1e-12, f"{what}: max error {error:.3g} of largest {scale:.3g}"


def assert_inductor_matches_eager(make, x, steps=3, kwargs=None, fullgraph=True):
    kwargs = kwargs or {}
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make().train()
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=fullgraph)
    batches = [x + 0.1 * s * randn(*x.shape, seed=500 + s) if x.is_floating_point() else x for s in range(steps)]
    with torch._inductor.config.patch(fallback_random=True):
        for step, batch in enumerate(batches):
            got, want = train_step(compiled, batch, kwargs, step), train_step(eager, batch, kwargs, step)
            assert len(got[0]) == len(want[0])
            for i, (g, w) in enumerate(zip(got[0], want[0])):
                if w.is_floating_point():
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"step {step}, output {i}: {m}")
                else:
                    assert torch.equal(g, w), f"step {step}, output {i}: indices differ"
            assert_grads_close(got[1], want[1], f"step {step}: input gradient")
            assert got[2].keys() == want[2].keys(), f"step {step}: parameters with gradients differ"
            for name in want[2]:
                assert_grads_close(got[2][name], want[2][name], f"step {step}: gradient of {name}")
    torch.testing.assert_close(layer.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-5)
    return layer, eager


class Autocast(nn.Module):
    """`layer` run under CPU bf16 autocast (the quantization inside stays fp32)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(x, **kwargs)


def vq(**kw):
    return lambda: VectorQuantize(dim=8, codebook_size=16, **kw)


def rvq(**kw):
    return lambda: ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, **kw)


SEQ = randn(2, 24, 8, seed=1)
MASK = randn(2, 24, seed=2) > -0.5

# name -> (make, input, forward kwargs); one per update mechanism in CI
CONFIGS = {
    # VectorQuantize's update mechanisms
    "vq_ema": (vq(decay=0.8), SEQ, {}),
    "vq_kmeans_dead_codes_mask": (vq(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2.0), SEQ,
                                  {"mask": MASK}),
    "vq_heads_cosine": (vq(heads=2, codebook_dim=4, separate_codebook_per_head=True, use_cosine_sim=True), SEQ, {}),
    "vq_learnable_losses": (vq(learnable_codebook=True, ema_update=False, commitment_weight=0.5,
                               codebook_diversity_loss_weight=0.2, codebook_diversity_temperature=10.0,
                               orthogonal_reg_weight=0.1), SEQ, {}),
    "vq_affine_ema_weight": (vq(affine_param=True), SEQ, {"ema_update_weight": torch.linspace(0, 1, 16)}),
    "vq_straight_through_projection": (lambda: VectorQuantize(dim=8, codebook_dim=4, codebook_size=16,
                                                              straight_through=True), SEQ, {}),
    "vq_image": (lambda: VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True), randn(2, 8, 4, 4, seed=3),
                 {}),
    # ResidualVQ: per-stage updates, one shared update, quantize dropout (masked stages)
    "rvq_ema": (rvq(decay=0.8), SEQ, {}),
    "rvq_shared_codebook": (rvq(shared_codebook=True), SEQ, {}),
    "rvq_dropout_kmeans_dead_codes": (rvq(quantize_dropout=True, kmeans_init=True, kmeans_iters=2,
                                          threshold_ema_dead_code=1.0), SEQ, {"mask": MASK}),
    "rvq_quant_grad_frac_projection": (lambda: ResidualVQ(dim=8, codebook_dim=4, num_quantizers=3, codebook_size=16,
                                                          quant_grad_frac=0.5), SEQ, {}),
    "grouped_rvq_dropout": (lambda: GroupedResidualVQ(dim=8, groups=2, num_quantizers=3, codebook_size=16,
                                                      quantize_dropout=True), SEQ, {}),
    "hierarchical_shared_nested_dropout": (lambda: HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 2, 4],
                                                                  nested_dropout=0.7, kmeans_init=True,
                                                                  kmeans_iters=2), randn(2, 8, 4, seed=4), {}),
    "hierarchical_per_level": (lambda: HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 2, 4], shared_codebook=False,
                                                      threshold_ema_dead_code=1.0), randn(2, 8, 4, seed=5), {}),
    # the other families
    "fsq_projection": (lambda: FSQ(levels=[8, 5, 5], dim=8), SEQ, {}),
    "fsq_noise_dropout": (lambda: FSQ(levels=[8, 5, 5], noise_dropout=0.5, preserve_symmetry=True),
                          randn(2, 24, 3, seed=6), {}),
    "residual_fsq_dropout": (lambda: ResidualFSQ(dim=8, levels=[8, 5, 5], num_quantizers=3, quantize_dropout=True),
                             SEQ, {}),
    "grouped_residual_fsq": (lambda: GroupedResidualFSQ(dim=8, groups=2, levels=[8, 5, 5], num_quantizers=2), SEQ, {}),
    "lfq_entropy": (lambda: LFQ(dim=8, codebook_size=2**8, entropy_loss_weight=0.1), SEQ, {}),
    "lfq_spherical_projection": (lambda: LFQ(dim=8, codebook_size=2**4, spherical=True), SEQ, {}),
    "residual_lfq_dropout": (lambda: ResidualLFQ(dim=8, codebook_size=2**6, num_quantizers=3, quantize_dropout=True),
                             SEQ, {}),
    "grouped_residual_lfq": (lambda: GroupedResidualLFQ(dim=8, groups=2, codebook_size=2**4, num_quantizers=2), SEQ,
                             {}),
    "sim_vq": (lambda: SimVQ(dim=8, codebook_size=16), SEQ, {}),
    "residual_sim_vq_dropout": (lambda: ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=16,
                                                      quantize_dropout=True), SEQ, {}),
    "latent_quantize": (lambda: LatentQuantize(levels=[5, 5, 8], dim=8), SEQ.transpose(1, 2), {}),
    "fsp": (lambda: FSP(levels=[8, 8, 5], dim=8), SEQ, {}),
    "binary_mapper": (lambda: BinaryMapper(bits=6), randn(2, 24, 6, seed=7), {}),
    "random_projection": (lambda: RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=32), SEQ, {}),
    # VectorQuantize and ResidualVQ extras
    "vq_diveq": (vq(directional_reparam=True, threshold_ema_dead_code=2.0), SEQ, {}),
    "vq_sync_update_v": (vq(learnable_codebook=True, ema_update=False, sync_update_v=0.5), SEQ, {}),
    "vq_orthogonal_active_codes": (vq(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.1,
                                      orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=8), SEQ, {}),
    "vq_stochastic_sampling": (vq(stochastic_sample_codes=True, sample_codebook_temp=0.5), SEQ, {}),
    "vq_cross_entropy_commitment": (vq(commitment_use_cross_entropy_loss=True), SEQ, {}),
    "vq_manual_ema": (vq(manual_ema_update=True), SEQ, {}),
    "vq_topk": (vq(), SEQ, {"topk": 2}),
    "rvq_implicit_codebook": (rvq(implicit_neural_codebook=True), SEQ, {}),
    "rvq_beam_search": (rvq(beam_size=2), SEQ, {}),
    "rvq_diveq": (rvq(diveq=True), SEQ, {}),
    "rvq_per_stage_sizes": (lambda: ResidualVQ(dim=8, codebook_size=(16, 8, 4)), SEQ, {}),
    "hierarchical_image": (lambda: HierarchicalVQ(dim=8, codebook_size=16, scales=[1, 2, (2, 3)],
                                                  accept_image_fmap=True),
                           randn(2, 8, 4, 6, seed=8), {}),
    "lfq_token_mask": (lambda: LFQ(dim=8, codebook_size=2**4), SEQ, {"mask": MASK}),
    "vq_projection_bf16_autocast": (lambda: Autocast(VectorQuantize(dim=8, codebook_dim=4, codebook_size=16,
                                                                    kmeans_init=True, kmeans_iters=2)), SEQ, {}),
    "rvq_bf16_autocast": (lambda: Autocast(ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)), SEQ, {}),
}
# inherently eager work, a graph break (fullgraph=False): the accumulators are allocated on first
# use; an optimizer step runs inside the forward
GRAPH_BREAKS = {
    "vq_accumulate": (vq(), SEQ, {"accum_ema_update": True}),
    "vq_in_place_optimizer": (vq(learnable_codebook=True, ema_update=False,
                                 in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), SEQ, {}),
}
CI_CONFIGS = ["vq_kmeans_dead_codes_mask", "vq_affine_ema_weight", "rvq_shared_codebook",
              "rvq_dropout_kmeans_dead_codes", "hierarchical_shared_nested_dropout", "lfq_entropy"]


def _params(names, marks):
    return [pytest.param(name, id=name, marks=marks) for name in names]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", _params(CI_CONFIGS, ()) + _params(
    [name for name in CONFIGS if name not in CI_CONFIGS], pytest.mark.compile_sweep))
def test_inductor_training_equals_eager(name):
    make, x, kwargs = CONFIGS[name]
    assert_inductor_matches_eager(make, x, kwargs=kwargs)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", _params(GRAPH_BREAKS, pytest.mark.compile_sweep))
def test_inductor_with_a_graph_break_equals_eager(name):
    make, x, kwargs = GRAPH_BREAKS[name]
    assert_inductor_matches_eager(make, x, kwargs=kwargs, fullgraph=False)


# ------------------------------------------------------------------------------------------
# VectorQuantize with aot_eager (fullgraph): the training step equals eager's, and a non-finite
# batch raises inside the graph before any buffer changes (moved from test_vq.py)


def train_steps(layer, batches, masks, autocast=False):
    """One forward + backward per batch -> per step (out, indices, loss, x.grad, param grads)."""
    module = getattr(layer, "_orig_mod", layer)  # parameter names without the compile wrapper
    steps = []
    for step, (x, mask) in enumerate(zip(batches, masks)):
        torch.manual_seed(step)  # random draws (k-means, dead codes) alike in both runs
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, indices, loss = layer(x, mask=mask)
        (out.float().square().mean() + loss.sum()).backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        module.zero_grad()
        steps.append((out.detach(), indices, loss.detach(), x.grad, grads))
    return steps


def assert_compiled_matches_eager(layer, shape, steps=3, mask=False, autocast=False, fullgraph=True):
    """`steps` training steps of `layer` compiled against an eager twin; then a non-finite batch
    must raise in the compiled graph before any buffer changed (NaN in padding is fine)."""
    torch._dynamo.reset()
    eager = copy.deepcopy(layer.train())
    compiled = torch.compile(layer, fullgraph=fullgraph, backend="aot_eager")
    batches = [randn(*shape, seed=60 + s) for s in range(steps)]
    masks = [randn(*shape[:2], seed=70 + s) > -0.5 if mask else None for s in range(steps)]
    got, want = train_steps(compiled, batches, masks, autocast), train_steps(eager, batches, masks, autocast)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g[1], w[1]), f"indices differ at step {step}"
        torch.testing.assert_close(g[:1] + g[2:4], w[:1] + w[2:4], msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(g[4], w[4], msg=lambda m: f"parameter gradients, step {step}: {m}")
    torch.testing.assert_close(layer.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)

    before = buffers(layer)
    x = batches[0].clone()
    x[0, 0, 0] = float("nan")
    keep = torch.ones(shape[:2], dtype=torch.bool) if mask else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the graph compiled above
        # an assert inside the graph (no host sync): RuntimeError, with the eager message
        with pytest.raises(RuntimeError, match="non-finite values"):
            compiled(x.requires_grad_(True), mask=keep)
        assert_buffers_equal(before, layer)
        if mask:
            keep[0, 0] = False
            compiled(x, mask=keep)  # NaN in padding never enters
            assert all(torch.isfinite(buf).all() for buf in layer.buffers() if buf.is_floating_point())
    return eager


@pytest.mark.parametrize("kwargs,mask,autocast", [
    (dict(), False, False),
    (dict(heads=2, codebook_dim=4, separate_codebook_per_head=True), True, False),
    (dict(heads=2, codebook_dim=4, use_cosine_sim=True), False, False),
    (dict(learnable_codebook=True, ema_update=False, commitment_weight=0.5,
          codebook_diversity_loss_weight=0.2), True, False),
    (dict(codebook_dim=4), False, True),
], ids=["default", "separate_heads_mask", "shared_heads_cosine", "learnable_losses", "bf16_autocast"])
def test_compile_fullgraph_training_matches_eager(kwargs, mask, autocast):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=8, codebook_size=16, **kwargs)
    assert_compiled_matches_eager(layer, (2, 12, 8), mask=mask, autocast=autocast)


def test_compile_kmeans_init_and_dead_codes_match_eager():
    """Both trace into one graph (fullgraph=True): k-means runs as a run-time op on the first
    batch, dead-code replacement is branch-free; the steps equal eager's."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2.0)
    eager = assert_compiled_matches_eager(layer, (2, 12, 4), steps=2, mask=True)
    assert bool(eager._codebook.initted) and int(eager._codebook.dead_codes_replaced) > 0
