"""QLoRA and QDoRA: our LoRA and DoRA over an fp8 or NF4 base, against the same layers over the dequantized weight.

The reference is independent of the quantized code path: a plain nn.Linear / nn.Conv2d holding the
dequantized values, adapted by the LoRA and DoRA layers the other tests check against PEFT and LyCORIS.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_training import _stop_when, metrics, settings, small_dataset, train  # noqa: F401 (a fixture)
from torch import nn

from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec
from trainer.adapters.quantized import (
    QuantizedConv2d,
    QuantizedLinear,
    QuantizedWeight,
    frozen_weight,
    is_quantized,
    quantize_frozen,
)
from trainer.adapters.vera import projections_for
from trainer.builtin.tiny import build_tiny_pipeline
from trainer.cli import main
from trainer.errors import MissingPackageError
from trainer.kohya.adapter_file import load_adapter
from trainer.training.signals import StopRequested

PRECISIONS = ["fp8", "nf4"]
CPU = torch.device("cpu")
LAYER_CASES = [
    ("linear", lambda: nn.Linear(128, 64)),
    ("conv3x3", lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1)),
    ("conv1x1_nobias", lambda: nn.Conv2d(32, 16, 1, bias=False)),
]
# What each format keeps of a weight (relative Frobenius error on SDXL-like weights): e4m3's 3 mantissa bits
# with a scale per row; NF4's 16 levels per block of 64.
ROUND_TRIP_ERROR = {"fp8": 0.04, "nf4": 0.12}


def _quantized(base: nn.Module, precision: str) -> nn.Module:
    quantized_class = QuantizedLinear if isinstance(base, nn.Linear) else QuantizedConv2d
    return quantized_class(base, precision, CPU, torch.float32)


def _dequantized_copy(base: nn.Module, quantized: nn.Module) -> nn.Module:
    """A plain layer holding exactly the values the quantized one computes with."""
    reference = copy.deepcopy(base).requires_grad_(False)
    reference.weight.copy_(frozen_weight(quantized))
    return reference


def _input_for(base: nn.Module, generator: torch.Generator) -> torch.Tensor:
    shape = (3, 5, base.in_features) if isinstance(base, nn.Linear) else (2, base.in_channels, 9, 9)
    return torch.randn(shape, generator=generator, requires_grad=True)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_trip_and_size(precision):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1280, 1280, generator=generator) * 0.02  # SDXL attention weights are about this size
    stored = QuantizedWeight(weight, precision)
    back = stored.dequantize()
    assert back.shape == weight.shape and back.dtype == weight.dtype
    assert ((back - weight).norm() / weight.norm()).item() < ROUND_TRIP_ERROR[precision]
    bf16_bytes = weight.numel() * 2
    assert stored.nbytes() / bf16_bytes <= {"fp8": 0.52, "nf4": 0.30}[precision]
    conv = torch.randn(64, 32, 3, 3, generator=generator) * 0.02
    assert QuantizedWeight(conv, precision).dequantize().shape == conv.shape  # stored flat, given back whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_lookup_gives_torchaos_values_bit_for_bit(dtype):
    """Our one-lookup NF4 decode (written for speed) against torchao's own ``get_original_weight``."""
    generator = torch.Generator().manual_seed(7)
    for shape in [(640, 2048), (64, 32 * 3 * 3)]:
        stored = QuantizedWeight((torch.randn(shape, generator=generator) * 0.02).to(dtype), "nf4")
        expected = stored.storage.get_original_weight()
        assert torch.equal(stored.dequantize(), expected.reshape(shape))


def test_qdora_dequantizes_twice_per_step_and_the_norm_once(monkeypatch):
    """The norm's dequantized weight serves the forward that asked for it; backward dequantizes again."""
    calls, dequantize = [], QuantizedWeight.dequantize

    def counted(self, dtype=None):
        calls.append(dtype)
        return dequantize(self, dtype)

    monkeypatch.setattr(QuantizedWeight, "dequantize", counted)
    base = nn.Linear(64, 32).requires_grad_(False)
    layer = make_adapter(_quantized(base, "nf4"), AdapterSpec(rank=4, alpha=4, dora=True))
    calls.clear()
    layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert len(calls) == 2  # the norm (its weight reused by the forward), then backward
    layer(torch.randn(2, 64, requires_grad=True)).sum().backward()  # a second micro-batch: the norm is cached
    assert len(calls) == 4


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name,make_base", LAYER_CASES)
def test_quantized_layer_is_the_plain_layer_over_its_dequantized_weight(name, make_base, precision):
    torch.manual_seed(1)
    base = make_base().requires_grad_(False)
    quantized = _quantized(base, precision)
    reference = _dequantized_copy(base, quantized)
    x = _input_for(base, torch.Generator().manual_seed(2))
    torch.testing.assert_close(quantized(x), reference(x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(quantized(x).square().sum(), x)
    (expected,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)  # dx by hand vs autograd's kernel


def _largest_saved(fn) -> int:
    """The most elements any tensor saved for backward has, while ``fn`` runs forward."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return max(sizes)


@pytest.mark.parametrize("kind", ["lora", "dora_input", "dora_output"])
def test_nothing_weight_sized_is_saved_for_backward(kind):
    """The point of a quantized base: no dequantized weight stays alive from forward to backward."""
    base = nn.Linear(256, 512).requires_grad_(False)  # weight: 131072 values, more than any activation here
    spec = AdapterSpec(rank=4, alpha=4, dora=kind != "lora", dora_axis="output" if kind.endswith("output") else "input")
    layer = make_adapter(_quantized(base, "nf4"), spec)
    x = torch.randn(2, 8, 256, requires_grad=True)
    assert _largest_saved(lambda: layer(x)) < base.weight.numel() // 4
    plain = make_adapter(copy.deepcopy(base), spec)
    assert _largest_saved(lambda: plain(x)) == base.weight.numel()  # what the plain layer keeps, for contrast


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["lora", "dora_input", "dora_output", "vera", "dvora"])
@pytest.mark.parametrize("name,make_base", LAYER_CASES)
def test_qlora_and_qdora_match_lora_and_dora_over_the_dequantized_weight(name, make_base, kind, precision):
    """Same forward and gradients as over a plain copy of the dequantized weight.

    Both compute with the same float32 values in the same order; 1e-6 allows for a different reduction order.
    """
    torch.manual_seed(3)
    base = make_base().requires_grad_(False)
    quantized = _quantized(base, precision)
    axis, vera = "output" if kind.endswith("output") else "input", kind in ("vera", "dvora")
    spec = AdapterSpec(rank=3, alpha=5, dora="dora" in kind or kind == "dvora", dora_axis=axis, vera=vera)
    projections = projections_for(0, [(3, base.weight[0].numel(), base.weight.shape[0])]) if vera else None
    ours = make_adapter(quantized, spec, projections=projections)
    reference = make_adapter(_dequantized_copy(base, quantized), spec, projections=projections)
    with torch.no_grad():
        (ours.vera_b if vera else ours.lora_up).normal_(0, 0.1)  # an adapter that has learned something
        reference.load_weights(ours.to_weights())
    x = _input_for(base, torch.Generator().manual_seed(4))
    y_ours, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-6, atol=1e-6)
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert [name for name, _ in trained] == [name for name, p in reference.named_parameters() if p.requires_grad]
    grads_ours = torch.autograd.grad(y_ours.square().sum(), [x, *(p for _, p in trained)])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *(p for p in reference.parameters() if p.requires_grad)])
    for got, expected in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.merged_weight(), reference.merged_weight(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("name,make_base", LAYER_CASES)
def test_a_fresh_qdora_is_the_quantized_model(name, make_base, axis, precision):
    """The magnitude starts at the dequantized weight's norm, so an untrained adapter changes nothing."""
    torch.manual_seed(5)
    quantized = _quantized(make_base().requires_grad_(False), precision)
    layer = make_adapter(quantized, AdapterSpec(rank=4, alpha=8, dora=True, dora_axis=axis))
    x = _input_for(quantized, torch.Generator().manual_seed(6))
    if axis == "input":
        assert torch.equal(layer(x), quantized(x))
    else:  # the bias is added after the scale instead of inside the kernel: 1-ulp rounding
        torch.testing.assert_close(layer(x), quantized(x), rtol=1e-6, atol=1e-6)


def test_a_quantized_base_is_never_merged_into():
    layer = make_adapter(_quantized(nn.Linear(64, 64), "nf4"), AdapterSpec(rank=2, alpha=2, dora=True))
    assert not layer.can_merge
    with pytest.raises(RuntimeError, match="quantized"):
        layer.merge()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_frozen_replaces_every_linear_and_conv_of_the_tiny_unet(precision):
    unet = build_tiny_pipeline().unet
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    report = quantize_frozen(unet, precision, CPU, torch.float32)
    assert report["layers"] == layers and report["kept"] == []
    assert report["after"] < report["before"]
    assert sum(is_quantized(m) for m in unet.modules()) == layers
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) and not is_quantized(m) for m in unet.modules())


def test_missing_torchao_names_the_setting_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao` fail, installed or not
    with pytest.raises(MissingPackageError, match="pip install torchao") as caught:
        QuantizedWeight(torch.randn(64, 64), "nf4")
    assert "nf4" in str(caught.value)


# --- end to end on the tiny model ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_tiny_model_trains_on_a_quantized_base_and_the_file_verifies(
    tiny_dir,
    small_dataset,  # noqa: F811 (the fixture imported above)
    tmp_path,
    capsys,
    precision,
):
    data = settings(
        tiny_dir, small_dataset, tmp_path / "cache", model={"base_precision": precision}, training={"epochs": 1}
    )
    adapter = train(data, tmp_path / "run")  # samples too: over a quantized base the adapters run unmerged
    assert all(math.isfinite(row["loss"]) for row in metrics(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run/samples/epoch_001").iterdir()) == ["00.png", "prompts.json"]
    loaded = load_adapter(adapter)
    assert all(weights.is_dora for weights in loaded.adapters.values())  # a plain kohya DoRA file
    capsys.readouterr()
    code = main(["verify", str(adapter), "--model", str(tiny_dir), "--base-precision", precision, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"]
    distance = report["quantized_base"]
    assert 0 < distance["mean_rel_error"] <= 2 * distance["base_error"]


def test_resume_on_a_quantized_base_is_bit_identical(tiny_dir, small_dataset, tmp_path):  # noqa: F811
    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        model={"base_precision": "nf4"},
        training={"epochs": 1},
        sampling={"prompts": []},
    )
    straight = train(data, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    _stop_when(interrupted, 2)
    with pytest.raises(StopRequested):
        train(data, interrupted)
    resumed = train(data, interrupted, resume="auto")
    ours, theirs = load_file(resumed), load_file(straight)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert [row["loss"] for row in metrics(interrupted)] == [row["loss"] for row in metrics(tmp_path / "straight")]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1280, 1280), (10240, 1280), (320, 320, 3, 3), (16, 16), (64, 48)])
def test_stored_bytes_from_the_shape_alone_match_torchao(shape, dtype, precision):
    """The memory estimate quantizes fake tensors to placeholders of this size: it must be the real one."""
    stored = QuantizedWeight(torch.randn(shape).to(dtype), precision)
    assert QuantizedWeight.stored_bytes(torch.Size(shape), dtype, precision) == stored.nbytes()
