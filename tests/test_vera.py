"""VeRA and DVoRA layers: PEFT's VeRA forward and backward, identity at start, DVoRA's relation to VeRA, the file."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.dora_norm import weight_norm
from trainer.adapters.injection import NetworkSpec, inject_adapters, make_adapter
from trainer.adapters.layers import AdapterSpec
from trainer.adapters.vera import DVoRALayer, SharedProjections, VeRALayer, projections_for, recover_vectors
from trainer.adapters.weights import merged_weight


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


class _Mlp(nn.Module):
    """Linear layers of different widths, so every layer takes a different slice of the shared matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 7)
        self.c = nn.Linear(7, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.gelu(self.b(F.gelu(self.a(x)))))


NAMES = ("a", "b", "c")


def _ours(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, VeRALayer]:
    bases = {name: getattr(model, name) for name in NAMES}
    projections = projections_for(seed, [(spec.rank, b.in_features, b.out_features) for b in bases.values()])
    layers = {name: make_adapter(base, spec, projections=projections) for name, base in bases.items()}
    for name, layer in layers.items():
        setattr(model, name, layer)
    return layers


def test_matches_peft_vera_forward_and_backward():
    """Same seed: PEFT's shared matrices bit for bit; same vectors: the same outputs and gradients."""
    from peft import VeraConfig, get_peft_model

    torch.manual_seed(0)
    model = _Mlp().requires_grad_(False)
    rank, seed = 6, 7
    # VeRA has no alpha: with alpha = rank our gamma is 1.
    ours_model = copy.deepcopy(model)
    ours = _ours(ours_model, AdapterSpec(rank=rank, alpha=rank, vera=True), seed)
    peft_model = get_peft_model(
        copy.deepcopy(model), VeraConfig(r=rank, target_modules=list(NAMES), projection_prng_key=seed)
    )
    projections = ours["a"].vera_projections
    assert torch.equal(projections.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, peft_model.base_model.vera_B["default"])

    generator = torch.Generator().manual_seed(1)
    for name, layer in ours.items():
        peft_layer = getattr(peft_model.base_model.model, name)
        with torch.no_grad():
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=generator))
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=generator))
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_b)

    x = torch.randn(3, 5, 12, generator=generator)
    x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours_model(x_ours), peft_model(x_peft)
    assert _rel(y_ours, y_peft) < 1e-6
    upstream = torch.randn(y_ours.shape, generator=generator)
    (y_ours * upstream).sum().backward()
    (y_peft * upstream).sum().backward()
    assert _rel(x_ours.grad, x_peft.grad) < 1e-6
    for name, layer in ours.items():
        peft_layer = getattr(peft_model.base_model.model, name)
        assert _rel(layer.vera_d.grad, peft_layer.vera_lambda_d["default"].grad) < 1e-5
        assert _rel(layer.vera_b.grad, peft_layer.vera_lambda_b["default"].grad) < 1e-5


def test_injection_sizes_projections_as_peft_does(tiny_dir):
    """One pair per part, the largest in and out of its adapted layers: PEFT's matrices for the same targets."""
    from peft import VeraConfig, get_peft_model

    from trainer.builtin.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet.requires_grad_(False)
    reference = copy.deepcopy(unet)
    adapters = inject_adapters(unet, "unet", NetworkSpec(dora=False, vera=True, rank=8, alpha=8, vera_seed=3))
    paths = [path for path, module in unet.named_modules() if isinstance(module, VeRALayer)]
    peft_model = get_peft_model(reference, VeraConfig(r=8, target_modules=paths, projection_prng_key=3))
    shared = {id(layer.vera_projections) for layer in adapters.values()}
    assert len(shared) == 1
    projections = next(iter(adapters.values())).vera_projections
    assert torch.equal(projections.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, peft_model.base_model.vera_B["default"])
    assert not any("vera_A" in key for key in unet.state_dict())  # rebuilt from the seed, never saved with the model


CASES = {
    "linear": lambda: nn.Linear(10, 6),
    "conv3x3": lambda: nn.Conv2d(4, 6, 3, padding=1),
}


def _input(base: nn.Module, generator: torch.Generator) -> torch.Tensor:
    shape = (2, 3, 10) if isinstance(base, nn.Linear) else (2, 4, 5, 5)
    return torch.randn(shape, generator=generator)


def _layer(make_base, dora: bool, seed: int = 0) -> VeRALayer:
    torch.manual_seed(seed)
    base = make_base()
    weight = base.weight
    spec = AdapterSpec(rank=4, alpha=2.0, dora=dora, vera=True)
    projections = projections_for(5, [(spec.rank, weight[0].numel(), weight.shape[0])])
    return make_adapter(base, spec, projections=projections)


@pytest.mark.parametrize("dora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("case", CASES)
def test_fresh_adapter_is_the_identity(case, dora):
    layer = _layer(CASES[case], dora)
    assert isinstance(layer, DVoRALayer) == dora
    x = _input(layer.base, torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), layer.base(x))
    assert torch.equal(layer.merged_weight(), layer.base.weight)


@pytest.mark.parametrize("dora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_explicit_merged_weight(case, dora):
    """The training forward (activation scaling, nothing weight-sized) against W' built and applied directly."""
    layer = _layer(CASES[case], dora)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.vera_d.normal_(generator=generator)
        layer.vera_b.normal_(generator=generator)
        if dora:
            layer.dora_scale.mul_(1 + 0.3 * torch.rand(layer.dora_scale.shape, generator=generator))
    x = _input(layer.base, generator)
    reference = copy.deepcopy(layer)
    y = layer(x)
    # Reference: W' from the factors as a front end would build it, with DoRA's norm detached (paper, 4.3).
    down, up = reference.factors()
    v = reference.base.weight + reference.gamma * (up.flatten(1) @ down.flatten(1)).reshape(reference.base.weight.shape)
    if dora:
        v = v * (reference.dora_scale / weight_norm(v, "input").detach())
    conv = isinstance(reference.base, nn.Conv2d)
    y_ref = F.conv2d(x, v, reference.base.bias, padding=1) if conv else F.linear(x, v, reference.base.bias)
    assert _rel(y, y_ref) < 1e-6
    upstream = torch.randn(y.shape, generator=generator)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    names = ["vera_d", "vera_b", *(["dora_scale"] if dora else [])]
    for name in names:
        assert _rel(getattr(layer, name).grad, getattr(reference, name).grad) < 1e-5, name
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == set(names)


@pytest.mark.parametrize("case", CASES)
def test_dvora_with_its_magnitude_at_the_direction_norm_is_vera(case):
    """With m = ||V|| held fixed, DVoRA's scale is 1: the same output and the same d, b gradients as VeRA."""
    dvora, vera = _layer(CASES[case], True), _layer(CASES[case], False)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in ("vera_d", "vera_b"):
            value = torch.randn(getattr(vera, name).shape, generator=generator)
            getattr(vera, name).copy_(value)
            getattr(dvora, name).copy_(value)
        down, up = vera.factors()
        v = vera.base.weight + vera.gamma * (up.flatten(1) @ down.flatten(1)).reshape(vera.base.weight.shape)
        dvora.dora_scale.copy_(weight_norm(v, "input"))
    dvora.dora_scale.requires_grad_(False)
    x = _input(vera.base, generator)
    y_dvora, y_vera = dvora(x), vera(x)
    assert _rel(y_dvora, y_vera) < 1e-6
    upstream = torch.randn(y_vera.shape, generator=generator)
    (y_dvora * upstream).sum().backward()
    (y_vera * upstream).sum().backward()
    for name in ("vera_d", "vera_b"):
        assert _rel(getattr(dvora, name).grad, getattr(vera, name).grad) < 1e-5


@pytest.mark.parametrize("dora", [False, True], ids=["vera", "dvora"])
def test_file_weights_are_the_kohya_factors_and_load_back(dora):
    """up = diag(b) B and down = diag(d) A: the file merges to the layer's weight and loads back into d, b."""
    layer = _layer(CASES["conv3x3"], dora)
    with torch.no_grad():
        layer.vera_d.uniform_(0.5, 1.5)
        layer.vera_b.normal_()
    weights = layer.to_weights()
    assert weights.is_dora == dora and weights.down.shape == (4, 4, 3, 3) and weights.up.shape == (6, 4, 1, 1)
    assert torch.allclose(merged_weight(layer.base.weight, weights), layer.merged_weight(), atol=1e-6)
    fresh = _layer(CASES["conv3x3"], dora)
    fresh.load_weights(weights)
    assert torch.allclose(fresh.vera_d, layer.vera_d, rtol=1e-6) and torch.allclose(fresh.vera_b, layer.vera_b)
    half = copy.deepcopy(weights)
    half.down, half.up = weights.down.half().float(), weights.up.half().float()  # an fp16 file still loads
    fresh.load_weights(half)


def test_factors_of_other_matrices_are_refused():
    layer = _layer(CASES["linear"], True)
    weights = layer.to_weights()
    weights.down = torch.randn(weights.down.shape)  # not a row scaling of A
    with pytest.raises(ValueError, match="lora_down is not a row scaling of the rebuilt VeRA projection"):
        layer.load_weights(weights)
    other = projections_for(6, [(4, 10, 6)])  # another seed
    with pytest.raises(ValueError, match="not a row scaling"):
        recover_vectors(layer.to_weights().down, layer.to_weights().up, other.down_basis(4, (4, 10)),
                        other.up_basis(4, (6, 4)), tolerance=1e-2)  # fmt: skip


def test_projections_rebuild_from_their_record_and_refuse_a_changed_one():
    projections = SharedProjections(11, 8, 40, 24)
    record = projections.describe()
    rebuilt = SharedProjections.rebuild(record)
    assert torch.equal(rebuilt.vera_A, projections.vera_A) and torch.equal(rebuilt.vera_B, projections.vera_B)
    with pytest.raises(ValueError, match="no longer gives the matrices"):
        SharedProjections.rebuild(record | {"seed": 12})
    with pytest.raises(ValueError, match="lacks sha256"):
        SharedProjections.rebuild({k: v for k, v in record.items() if k != "sha256"})


@pytest.mark.parametrize("dora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("case", CASES)
def test_no_factor_is_kept_between_forward_and_backward(case, dora):
    """At VeRA's ranks the factors are large (SDXL, rank 256: 2.7 GB for all layers); the backward computes
    them again rather than holding them."""
    layer = _layer(CASES[case], dora)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(_input(layer.base, torch.Generator().manual_seed(0)))
    shared = {layer.vera_projections.vera_A.data_ptr(), layer.vera_projections.vera_B.data_ptr()}  # slices: no memory
    factors = [t for t in saved if tuple(t.shape) in (layer.down_shape, layer.up_shape) and t.data_ptr() not in shared]
    assert saved and not factors
    y.sum().backward()
    assert layer.vera_d.grad is not None and layer.vera_b.grad is not None


@pytest.mark.parametrize("case", CASES)
def test_vera_function_gradients_match_finite_differences_with_rank_dropout(case):
    """VeRA's own backward (d's gradient from A x, up built again) against finite differences, in float64,
    with a rank-dropout mask and the input, bias, d and b all differentiable."""
    from trainer.adapters.dora_autograd import ConvOps, LinearOps, VeraFunction

    generator = torch.Generator().manual_seed(9)
    conv = case == "conv3x3"
    base = CASES[case]().double()
    rank, out = 3, base.weight.shape[0]
    a = torch.randn(rank, *base.weight.shape[1:], generator=generator, dtype=torch.float64)
    b_basis = torch.randn(out, rank, *([1, 1] if conv else []), generator=generator, dtype=torch.float64)
    x = torch.randn((2, 4, 5, 5) if conv else (2, 3, 10), generator=generator, dtype=torch.float64)
    mask = (torch.rand((2, rank, 1, 1) if conv else (2, 1, rank), generator=generator) > 0.3).double() / 0.7
    ops, up_ops = (ConvOps(padding=(1, 1)), ConvOps()) if conv else (LinearOps(), LinearOps())
    inputs = (
        x.requires_grad_(),
        base.weight.detach(),
        base.bias.detach().clone().requires_grad_(),
        torch.randn(rank, generator=generator, dtype=torch.float64).requires_grad_(),
        torch.randn(out, generator=generator, dtype=torch.float64).requires_grad_(),
    )

    def function(*args):
        return VeraFunction.apply(*args, 0.7, mask, ops, up_ops, lambda: (a, b_basis))

    assert torch.autograd.gradcheck(function, inputs)
