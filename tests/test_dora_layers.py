"""The adapter layers against independent implementations: PEFT's DoRA, an explicit W' reference, gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.dora_autograd import ConvOps, DoraInputAxis, DoraOutputAxis, LinearOps
from trainer.adapters.dora_norm import direction_norm, weight_norm, weight_norm_sq
from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec, DoRALayer, LoRALayer
from trainer.adapters.norm_group import DoRANormGroup

LAYER_CASES = [
    ("linear", lambda: nn.Linear(20, 12)),
    ("linear_nobias", lambda: nn.Linear(9, 31, bias=False)),
    ("conv3x3_s2", lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1)),
    ("conv1x1", lambda: nn.Conv2d(7, 5, 1)),
    ("conv5x3_dil", lambda: nn.Conv2d(4, 6, (5, 3), padding=(2, 2), dilation=(1, 2))),
]


def _input_for(base: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return torch.randn(3, 7, base.in_features, generator=generator)
    return torch.randn(2, base.in_channels, 9, 11, generator=generator)


def _randomise(layer: LoRALayer, generator: torch.Generator) -> None:
    """Move the adapter away from its identity init so every term of the math is exercised."""
    with torch.no_grad():
        layer.lora_down.copy_(torch.randn(layer.lora_down.shape, generator=generator) * 0.3)
        layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=generator) * 0.3)
        if isinstance(layer, DoRALayer):
            noise = torch.rand(layer.dora_scale.shape, generator=generator) + 0.5
            layer.dora_scale.mul_(noise)


def _apply_base(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name,make_base", LAYER_CASES)
@pytest.mark.parametrize("axis", ["input", "output"])
def test_fresh_dora_is_exactly_identity(name, make_base, axis):
    base = make_base()
    generator = torch.Generator().manual_seed(1)
    x = _input_for(base, generator)
    layer = make_adapter(base, AdapterSpec(rank=4, alpha=8, dora=True, dora_axis=axis))
    assert torch.equal(
        layer.dora_scale.reshape(-1) / layer.direction_norm().reshape(-1), torch.ones(layer.dora_scale.numel())
    )
    if axis == "input":
        assert torch.equal(layer(x), base(x))
    else:  # same math; the bias is added after the scale instead of inside the kernel, so 1-ulp rounding
        torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    dims = (0, *range(2, base.weight.dim())) if axis == "input" else tuple(range(1, base.weight.dim()))
    explicit = torch.linalg.vector_norm(base.weight.detach(), dim=dims, keepdim=True)  # ||W|| straight from W
    torch.testing.assert_close(layer.dora_scale, explicit, rtol=1e-6, atol=0)


# PEFT 0.21 builds its conv lora_A without the base's dilation, so the dilated case is left to the
# explicit reference test below.
PEFT_CASES = [case for case in LAYER_CASES if case[0] != "conv5x3_dil"]


@pytest.mark.parametrize("name,make_base", PEFT_CASES)
def test_output_axis_matches_peft_dora(name, make_base):
    """PEFT's DoRA is output-axis with a detached norm: forward and every gradient must agree."""
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(2)
    base = make_base()
    x = _input_for(base, generator)
    rank, alpha = 4, 6.0

    ours = make_adapter(copy.deepcopy(base), AdapterSpec(rank=rank, alpha=alpha, dora=True, dora_axis="output"))
    _randomise(ours, generator)

    wrapper = nn.Sequential(copy.deepcopy(base))
    peft_model = get_peft_model(wrapper, LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_down)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_up)
        magnitude = peft_layer.lora_magnitude_vector["default"].weight
        magnitude.copy_(ours.dora_scale.reshape(magnitude.shape))

    x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours(x_ours), peft_model(x_peft)
    assert _rel(y_ours, y_peft) < 1e-5
    upstream = torch.randn(y_ours.shape, generator=generator)
    (y_ours * upstream).sum().backward()
    (y_peft * upstream).sum().backward()
    assert _rel(x_ours.grad, x_peft.grad) < 1e-5
    assert _rel(ours.lora_down.grad, peft_layer.lora_A["default"].weight.grad) < 1e-5
    assert _rel(ours.lora_up.grad, peft_layer.lora_B["default"].weight.grad) < 1e-5
    assert _rel(ours.dora_scale.grad.reshape(magnitude.shape), magnitude.grad) < 1e-5


def _reference_forward(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """Builds W' explicitly (the thing our training forward avoids) and applies it with F.linear/F.conv2d."""
    base = layer.base
    w = base.weight
    down, up = layer.lora_down, layer.lora_up
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    v = w + layer.gamma * delta
    if isinstance(layer, DoRALayer):
        norm = weight_norm(v, layer.spec.dora_axis).detach()  # the paper's detached norm
        v = v * (layer.dora_scale / norm)
    return _apply_base(base, x, v)


@pytest.mark.parametrize("name,make_base", LAYER_CASES)
@pytest.mark.parametrize("kind", ["lora", "dora-input", "dora-output"])
def test_matches_explicit_merged_weight_reference(name, make_base, kind):
    generator = torch.Generator().manual_seed(3)
    base = make_base()
    spec = AdapterSpec(rank=3, alpha=5, dora=kind != "lora", dora_axis="output" if kind.endswith("output") else "input")
    ours = make_adapter(base, spec)
    _randomise(ours, generator)
    reference = copy.deepcopy(ours)
    x = _input_for(base, generator)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), _reference_forward(reference, x_ref)
    assert _rel(y_ours, y_ref) < 1e-5
    upstream = torch.randn(y_ours.shape, generator=generator)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert _rel(x_ours.grad, x_ref.grad) < 1e-5
    for name_ in ("lora_down", "lora_up") + (("dora_scale",) if spec.dora else ()):
        assert _rel(getattr(ours, name_).grad, getattr(reference, name_).grad) < 1e-5, name_


@pytest.mark.parametrize("shape", [(20,), (5, 20), (2, 3, 5, 20)])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_linear_adapters_take_any_leading_shape(shape, kind):
    """The adapter adds into the base's output on 2-D rows; a vector or a 4-D batch comes back in its own shape."""
    generator = torch.Generator().manual_seed(4)
    ours = make_adapter(nn.Linear(20, 12), AdapterSpec(rank=3, alpha=5, dora=kind == "dora"))
    _randomise(ours, generator)
    reference = copy.deepcopy(ours)
    x = torch.randn(shape, generator=generator)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), _reference_forward(reference, x_ref)
    assert y_ours.shape == (*shape[:-1], 12)
    assert _rel(y_ours, y_ref) < 1e-5
    y_ours.sum().backward()
    y_ref.sum().backward()
    assert _rel(x_ours.grad, x_ref.grad) < 1e-5
    assert _rel(ours.lora_down.grad, reference.lora_down.grad) < 1e-5


@pytest.mark.parametrize("function", [DoraInputAxis, DoraOutputAxis])
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scaled", ["activations", "weights"])
def test_gradcheck_float64(function, conv, masked, scaled):
    """Finite differences on the custom functions, the norm a constant input: the detached-norm semantics.

    ``scaled``: few tokens (the forward scales the activations) or many (it scales the smaller weights)."""
    generator = torch.Generator().manual_seed(4)
    many = scaled == "weights"

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    rank, out_ch, in_ch = 3, 5, 4
    if conv:
        ops, up_ops = ConvOps((2, 1), (1, 1), (1, 1)), ConvOps()
        x, weight = rand(2, in_ch, *((12, 10) if many else (2, 2))), rand(out_ch, in_ch, 3, 3).detach()
        down, up = rand(rank, in_ch, 3, 3), rand(out_ch, rank, 1, 1)
        channels = in_ch if function is DoraInputAxis else out_ch
        norm = torch.rand(1, channels, 1, 1, generator=generator, dtype=torch.float64) + 0.5
        mask = (torch.rand(2, rank, 1, 1, generator=generator) > 0.3).double() if masked else None
    else:
        ops = up_ops = LinearOps()
        x, weight = rand(2, 40 if many else 1, in_ch), rand(out_ch, in_ch).detach()
        down, up = rand(rank, in_ch), rand(out_ch, rank)
        channels = in_ch if function is DoraInputAxis else out_ch
        norm = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
        mask = (torch.rand(2, 1, rank, generator=generator) > 0.3).double() if masked else None
    bias = rand(out_ch)
    magnitude = rand(channels)  # the layer's dora_scale shape does not matter: it is reshaped like the norm
    assert torch.autograd.gradcheck(
        lambda *t: function.apply(t[0], t[1], norm, weight, t[2], t[3], t[4], 0.7, mask, ops, up_ops),
        (x, magnitude, bias, down, up),
    )


@pytest.mark.parametrize("name,make_base", LAYER_CASES)
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factored_norm_matches_direct_norm(name, make_base, axis, dtype):
    generator = torch.Generator().manual_seed(5)
    base = make_base().to(dtype)
    w = base.weight
    rank, gamma = 4, 1.7
    down = torch.randn(rank, *w.shape[1:], generator=generator)
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=generator)
    factored = direction_norm(w, weight_norm_sq(w, axis), down, up, gamma, axis)
    v = w.double() + gamma * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
    assert _rel(factored.double(), weight_norm(v, axis).double().reshape(-1)) < 1e-5


@pytest.mark.parametrize("name,make_base", LAYER_CASES)
@pytest.mark.parametrize("kind", ["lora", "dora-input", "dora-output"])
def test_merge_equals_adapter_and_unmerge_is_bit_exact(name, make_base, kind):
    generator = torch.Generator().manual_seed(6)
    base = make_base()
    original = base.weight.detach().clone()
    spec = AdapterSpec(rank=4, alpha=2, dora=kind != "lora", dora_axis="output" if kind.endswith("output") else "input")
    layer = make_adapter(base, spec)
    _randomise(layer, generator)
    x = _input_for(base, generator)
    with torch.no_grad():
        y_adapter = layer(x)
        half = layer.merged_weight(0.5)
        layer.merge(1.0)
        y_merged = layer(x)
        layer.unmerge()
    assert _rel(y_merged, y_adapter) < 1e-5
    assert torch.equal(base.weight, original)
    # Strength as the front ends apply it: W + s * (W' - W).
    full = layer.merged_weight(1.0)
    torch.testing.assert_close(half, original + 0.5 * (full - original), rtol=1e-5, atol=1e-6)


def test_norm_cache_follows_optimizer_steps():
    """The cached ||V|| must be refreshed after each optimizer step, or the scale would be stale."""
    generator = torch.Generator().manual_seed(7)
    layer = make_adapter(nn.Linear(16, 8), AdapterSpec(rank=4, alpha=4, dora=True))
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(5, 16, generator=generator)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
        assert _rel(layer(x), _reference_forward(layer, x)) < 1e-5


@pytest.mark.parametrize("batch_bytes", [64 * 2**20, 1], ids=["one-batch", "chunked"])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_a_group_computes_each_norm_exactly_as_the_layer_alone(axis, batch_bytes, monkeypatch):
    """Layers of one shape share one batched computation (in chunks of at most NORM_BATCH_BYTES of factors);
    each norm is bit for bit the per-layer one, and an optimizer step on some layers makes exactly those stale."""
    monkeypatch.setattr("trainer.adapters.norm_group.NORM_BATCH_BYTES", batch_bytes)
    generator = torch.Generator().manual_seed(6)
    bases = [nn.Linear(24, 16) for _ in range(4)] + [nn.Linear(16, 40), nn.Conv2d(6, 8, 3, padding=1)]
    spec = AdapterSpec(rank=4, alpha=8, dora=True, dora_axis=axis)
    grouped = [make_adapter(base, spec) for base in bases]
    for layer in grouped:
        _randomise(layer, generator)
    alone = copy.deepcopy(grouped)
    group = DoRANormGroup(grouped)
    assert all(layer.norm_group is group for layer in grouped)
    for ours, reference in zip(grouped, alone):
        assert torch.equal(ours.direction_norm(), reference.direction_norm())
    with torch.no_grad():
        for layers in (grouped, alone):
            layers[1].lora_up.add_(0.5)
            layers[5].lora_down.mul_(2)
    kept = [layer._norm_cache for layer in grouped]
    grouped[1].direction_norm()  # one stale layer asks: the group refreshes every stale one, and nothing else
    assert [layer._norm_cache_key == layer._norm_key() for layer in grouped] == [True] * 6
    assert [layer._norm_cache is old for layer, old in zip(grouped, kept)] == [True, False, True, True, True, False]
    for ours, reference in zip(grouped, alone):
        assert torch.equal(ours.direction_norm(), reference.direction_norm())


def test_dropouts_only_in_training():
    generator = torch.Generator().manual_seed(8)
    base = nn.Linear(8, 8)
    layer = make_adapter(base, AdapterSpec(rank=4, alpha=4, dora=True, module_dropout=0.5, rank_dropout=0.5))
    _randomise(layer, generator)
    x = torch.randn(4, 3, 8, generator=generator)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    outputs = {tuple(layer(x).flatten()[:4].tolist()) for _ in range(12)}
    assert len(outputs) > 1


def test_bfloat16_autocast_runs_close_to_float32():
    generator = torch.Generator().manual_seed(9)
    layer = make_adapter(nn.Linear(32, 16), AdapterSpec(rank=4, alpha=4, dora=True))
    _randomise(layer, generator)
    x = torch.randn(4, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), layer(x)) < 2e-2
    y.float().sum().backward()
    assert layer.dora_scale.grad.dtype == torch.float32


def test_rejects_unsupported_layers():
    with pytest.raises(TypeError):
        LoRALayer(nn.Embedding(4, 4), AdapterSpec(rank=2, alpha=2))
    with pytest.raises(ValueError, match="groups"):
        LoRALayer(nn.Conv2d(4, 4, 3, groups=2), AdapterSpec(rank=2, alpha=2))
    with pytest.raises(ValueError, match="rank"):
        AdapterSpec(rank=0, alpha=1)
