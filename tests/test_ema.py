"""The adapter's moving average (training.ema_decay): its recurrence, the swap in and out, its files."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec
from trainer.errors import TrainStateError
from trainer.runs.run_directory import RunDirectory
from trainer.training.ema import AdapterEMA
from trainer.training.network import trainable_parameters


def dora_layers() -> dict:
    """Two DoRA layers with every factor random, so each parameter moves the output."""
    torch.manual_seed(1)
    layers = {f"stem{i}": make_adapter(nn.Linear(8, 6), AdapterSpec(rank=4, alpha=4.0, dora=True)) for i in range(2)}
    with torch.no_grad():
        for layer in layers.values():
            for param in layer.parameters(recurse=False):
                param.add_(torch.randn_like(param) * 0.3)
    return {"unet": layers}


def take_a_step(trainable: dict) -> None:
    """What an optimizer step does to the weights: changes them in place."""
    with torch.no_grad():
        for param in trainable.values():
            param.add_(torch.randn_like(param) * 0.1)


def test_the_average_is_the_explicit_recurrence_with_the_warm_up():
    trainable = trainable_parameters(dora_layers())
    ema = AdapterEMA(trainable, decay=0.9, every_n_steps=2)
    expected = {name: param.detach().double().clone() for name, param in trainable.items()}
    for step in range(1, 30):
        take_a_step(trainable)
        ema.update(step)
        if step % 2 == 0:
            decay = min(0.9, (1 + (step - 1)) / (10 + (step - 1)))  # OneTrainer's / diffusers' warm-up, t = step - 1
            for name, param in trainable.items():
                expected[name] = decay * expected[name] + (1 - decay) * param.detach().double()
    assert ema.decay_at(1) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.9
    for name, average in ema.state_dict().items():
        assert average.dtype == torch.float32
        torch.testing.assert_close(average.double(), expected[name], rtol=1e-6, atol=1e-6)


def test_swapped_in_holds_the_average_then_gives_back_the_trained_weights_bit_for_bit():
    adapters = dora_layers()
    trainable = trainable_parameters(adapters)
    ema = AdapterEMA(trainable, decay=0.5)
    take_a_step(trainable)
    ema.update(1)
    take_a_step(trainable)
    trained = {name: param.detach().clone() for name, param in trainable.items()}
    layer, x = adapters["unet"]["stem0"], torch.randn(3, 8)
    averaged = copy.deepcopy(layer)  # the same layer, to hold the average; its norm not cached yet
    with torch.no_grad():
        trained_out = layer(x)  # caches the trained weights' DoRA norm
        for name, param in averaged.named_parameters(recurse=False):
            param.copy_(ema.state_dict()[f"unet/stem0/{name}"])
        with ema.swapped_in():
            assert all(torch.equal(param, ema.state_dict()[name]) for name, param in trainable.items())
            # a stale norm (the trained weights') would give another output
            torch.testing.assert_close(layer(x), averaged(x), rtol=0, atol=1e-6)
        assert all(torch.equal(param, trained[name]) for name, param in trainable.items())
        assert torch.equal(layer(x), trained_out)


def test_a_resume_refuses_an_average_of_other_parameters(tmp_path):
    ema = AdapterEMA(trainable_parameters(dora_layers()), decay=0.9)
    saved = ema.state_dict()
    ema.load_state_dict(saved, tmp_path)
    with pytest.raises(TrainStateError, match="training.ema_decay"):
        ema.load_state_dict(None, tmp_path)
    with pytest.raises(TrainStateError, match="other parameters"):
        ema.load_state_dict({name: t for name, t in saved.items() if "stem1" not in name}, tmp_path)
    first = next(iter(saved))
    with pytest.raises(TrainStateError, match=first):
        ema.load_state_dict(saved | {first: torch.zeros(1)}, tmp_path)


def test_the_average_is_saved_beside_each_adapter_and_pruned_with_it(tmp_path):
    run = RunDirectory(tmp_path)
    run.create()
    names = ["a-step000002", "a-step000004", "a-step000006", "a"]
    for age, name in enumerate(names):
        for path in (run.adapters_dir / f"{name}.safetensors", run.adapters_dir / f"{name}-ema.safetensors"):
            path.write_bytes(b"")
            os.utime(path, (age, age))
    assert run.ema_twin(run.adapter_path("a", "final")).name == "a-ema.safetensors"
    assert [p.name for p in run.saved_adapters("a")] == [f"{name}.safetensors" for name in names]
    run.prune_adapters("a", keep_last=1)
    assert sorted(p.name for p in run.adapters_dir.iterdir()) == [
        "a-ema.safetensors",
        "a-step000006-ema.safetensors",
        "a-step000006.safetensors",
        "a.safetensors",
    ]
