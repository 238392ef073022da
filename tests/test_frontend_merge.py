"""Each front end's merge, as reproduced in trainer.kohya.frontend_merge, against our merged_weight and LyCORIS."""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.locon import LoConModule
from torch import Tensor, nn

from trainer.adapters.dora_norm import DoraAxis, weight_norm
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.kohya.frontend_merge import FRONT_ENDS, a1111_merge, comfyui_merge, invokeai_merge

RANK, ALPHA = 4, 2.0
# (out, in, kh, kw) or (out, in): Linear, a 3x3 conv and a 1x1 conv.
BASE_SHAPES = {"linear": (24, 16), "conv3x3": (8, 6, 3, 3), "conv1x1": (8, 6, 1, 1)}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def random_layer(shape: tuple[int, ...], axis: DoraAxis | None, seed: int) -> tuple[Tensor, AdapterWeights]:
    """A base weight and a trained-looking adapter: dW about a tenth of W, m 20 % off ||W||."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    out_features, in_features, *kernel = shape
    down = torch.randn(RANK, in_features, *kernel, generator=gen) * 0.3
    up = torch.randn(out_features, RANK, *[1] * len(kernel), generator=gen) * 0.3
    dora_scale = None
    if axis is not None:
        norm = weight_norm(base, axis)
        dora_scale = norm * (0.8 + 0.4 * torch.rand(norm.shape, generator=gen))
    return base, AdapterWeights(down, up, ALPHA, dora_scale)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layer", BASE_SHAPES)
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_lora_file_merges_the_same_everywhere(front_end: str, layer: str, strength: float) -> None:
    base, weights = random_layer(BASE_SHAPES[layer], None, seed=1)
    expected = merged_weight(base, weights, strength)
    assert relative_error(FRONT_ENDS[front_end](base, weights, strength), expected) < 1e-6


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layer", BASE_SHAPES)
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_input_axis_dora_merges_the_same_everywhere(front_end: str, layer: str, strength: float) -> None:
    base, weights = random_layer(BASE_SHAPES[layer], "input", seed=2)
    expected = merged_weight(base, weights, strength)
    assert relative_error(FRONT_ENDS[front_end](base, weights, strength), expected) < 1e-6


@pytest.mark.parametrize("layer", BASE_SHAPES)
@pytest.mark.parametrize("merge", [comfyui_merge, a1111_merge, invokeai_merge])
def test_output_axis_dora_is_merged_wrongly_by_front_ends(merge, layer: str) -> None:
    # docs/adapter-format.md section 4: A1111 and InvokeAI divide an (out, 1) magnitude by the input-column norm,
    # ComfyUI/Forge use ||W|| instead of ||V||. None raises, so verify must show the difference.
    base, weights = random_layer(BASE_SHAPES[layer], "output", seed=3)
    assert relative_error(merge(base, weights, 1.0), merged_weight(base, weights)) > 1e-3


def test_untrained_dora_is_the_identity_in_every_front_end() -> None:
    base, weights = random_layer(BASE_SHAPES["linear"], "input", seed=4)
    weights.up = torch.zeros_like(weights.up)
    weights.dora_scale = weight_norm(base, "input")
    for merge in FRONT_ENDS.values():
        assert relative_error(merge(base, weights, 1.0), base) < 1e-6


def lycoris_module(layer: str, wd_on_out: bool, seed: int) -> LoConModule:
    """LyCORIS' own DoRA module on a random layer, with random trained-looking tensors."""
    gen = torch.Generator().manual_seed(seed)
    shape = BASE_SHAPES[layer]
    org: nn.Module = nn.Linear(shape[1], shape[0]) if layer == "linear" else nn.Conv2d(shape[1], shape[0], shape[2:])
    module = LoConModule(f"lycoris_{layer}", org, 1.0, RANK, ALPHA, weight_decompose=True, wd_on_out=wd_on_out)
    with torch.no_grad():
        for param in (module.lora_down.weight, module.lora_up.weight):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        module.dora_scale.mul_(0.8 + 0.4 * torch.rand(module.dora_scale.shape, generator=gen))
    return module


@pytest.mark.parametrize("layer", BASE_SHAPES)
@pytest.mark.parametrize("wd_on_out", [False, True])
def test_merged_weight_matches_lycoris(layer: str, wd_on_out: bool) -> None:
    module = lycoris_module(layer, wd_on_out, seed=5)
    weights = AdapterWeights(
        module.lora_down.weight.detach(), module.lora_up.weight.detach(), ALPHA, module.dora_scale.detach()
    )
    assert weights.dora_axis == ("output" if wd_on_out else "input")
    with torch.no_grad():
        lycoris_weight, _ = module.get_merged_weight(multiplier=1.0)
    base = module.org_weight.detach()
    assert relative_error(merged_weight(base, weights), lycoris_weight) < 1e-6
    if not wd_on_out:  # the one layout every front end reads like LyCORIS does
        for merge in FRONT_ENDS.values():
            assert relative_error(merge(base, weights, 1.0), lycoris_weight) < 1e-6


def test_lycoris_strength_keeps_the_full_lora_delta() -> None:
    # Oddity to know when comparing: LyCORIS 4.1 scales only the DoRA rescale by its multiplier,
    # W_s = V + s * (V' - V) with V = W + gamma*dW, where all four front ends do W + s * (W' - W).
    module = lycoris_module("linear", wd_on_out=False, seed=6)
    weights = AdapterWeights(
        module.lora_down.weight.detach(), module.lora_up.weight.detach(), ALPHA, module.dora_scale.detach()
    )
    base = module.org_weight.detach()
    v = merged_weight(base, AdapterWeights(weights.down, weights.up, ALPHA))
    with torch.no_grad():
        lycoris_half, _ = module.get_merged_weight(multiplier=0.5)
    assert relative_error(lycoris_half, v + 0.5 * (merged_weight(base, weights) - v)) < 1e-6
    assert relative_error(lycoris_half, merged_weight(base, weights, 0.5)) > 1e-2
