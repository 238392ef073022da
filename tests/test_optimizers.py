"""Optimizers and schedules by name: param groups, lr curves equal to diffusers', clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers.optimization import get_scheduler
from torch import nn

from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec
from trainer.adapters.vera import projections_for
from trainer.config.parsing import from_dict
from trainer.config.schema import OptimizerSettings
from trainer.errors import ConfigError, MissingPackageError
from trainer.training.optimizers import (
    OPTIMIZERS,
    SCHEDULERS,
    ParamGroup,
    build_optimizer,
    build_scheduler,
    run_optimizer,
)

ADAM = {"weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-8}


def groups() -> tuple[list[ParamGroup], nn.Parameter]:
    """UNet with a DoRA magnitude, one text encoder, and an empty second text encoder."""
    unet, te1 = nn.Linear(4, 3), nn.Linear(3, 2)
    magnitude = nn.Parameter(torch.ones(3, 1))
    return [
        ParamGroup("unet", [unet.weight, magnitude, unet.bias], 1e-4),
        ParamGroup("text_encoder_1", list(te1.parameters()), 2e-5),
        ParamGroup("text_encoder_2", [], 3e-5),
    ], magnitude


def test_groups_keep_name_and_lr_and_split_off_no_decay():
    param_groups, magnitude = groups()
    optimizer = build_optimizer("adamw", param_groups, **ADAM, no_decay=lambda p: p is magnitude)
    summary = [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert summary == [("unet", 1e-4, 0.1, 2), ("unet/no_decay", 1e-4, 0.0, 1), ("text_encoder_1", 2e-5, 0.1, 2)]
    assert optimizer.param_groups[1]["params"][0] is magnitude
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert not optimizer.defaults["fused"]  # CPU parameters: the fused kernel is for CUDA


def test_small_groups_take_adamw_multi_tensor_form_off_cuda_and_step_as_the_loop_does(monkeypatch):
    """A group within FOREACH_GROUP_BYTES runs foreach (one temporary the group's size), a larger one the loop;
    the fused kernel (CUDA) leaves both alone. Both forms are the same AdamW, to rounding."""
    monkeypatch.setattr("trainer.training.optimizers.FOREACH_GROUP_BYTES", 4 * 14)  # the no_decay group: 3 values
    param_groups, magnitude = groups()
    optimizer = build_optimizer("adamw", param_groups, **ADAM, no_decay=lambda p: p is magnitude)
    assert [g["foreach"] for g in optimizer.param_groups] == [None, True, True]
    fused = build_optimizer("adamw", groups()[0], **ADAM, no_decay=None, fused=True)
    assert [g["foreach"] for g in fused.param_groups] == [None, None]
    loop_groups = [
        {**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]], "foreach": False}
        for g in optimizer.param_groups
    ]
    loop = torch.optim.AdamW(loop_groups)
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    loop_params = [p for g in loop_groups for p in g["params"]]
    for step in range(3):
        for p, q in zip(ours, loop_params):
            p.grad = q.grad = torch.full_like(p, 0.5 - step)
        optimizer.step()
        loop.step()
    for p, q in zip(ours, loop_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_no_decay_none_and_all_no_decay():
    param_groups, _ = groups()
    optimizer = build_optimizer("adamw", param_groups, **ADAM, no_decay=None)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder_1"]
    optimizer = build_optimizer("adamw", param_groups[1:], **ADAM, no_decay=lambda p: True)
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("text_encoder_1/no_decay", 0.0)]


def test_every_group_empty_is_an_error():
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer("adamw", [ParamGroup("unet", [], 1e-4)], **ADAM, no_decay=None)


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_optimizers_use_the_given_lr(name):
    param_groups, magnitude = groups()
    if name == "prodigy":  # one lr for all groups, conventionally 1.0
        param_groups = [ParamGroup(g.name, g.params, 1.0 if g.params else 0.5) for g in param_groups]
    optimizer = build_optimizer(name, param_groups, **ADAM, no_decay=lambda p: p is magnitude)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    loss = sum((p * p).sum() for g in optimizer.param_groups for p in g["params"])
    loss.backward()
    optimizer.step()
    after = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = {g.name: g.lr for g in param_groups}
    assert [g["lr"] for g in optimizer.param_groups] == [lrs["unet"], lrs["unet"], lrs["text_encoder_1"]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))


def test_prodigy_refuses_different_lrs_when_built():
    with pytest.raises(ValueError, match="unet=0.0001, text_encoder_1=2e-05"):
        build_optimizer("prodigy", groups()[0], **ADAM, no_decay=None)


def test_adafactor_keeps_a_fixed_lr():
    param_groups, _ = groups()
    optimizer = build_optimizer("adafactor", param_groups, **ADAM, no_decay=None)
    assert type(optimizer).__name__ == "Adafactor"
    assert all(not g["relative_step"] and not g["scale_parameter"] for g in optimizer.param_groups)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_curves_match_diffusers(name):
    ours = build_optimizer("adamw", groups()[0], **ADAM, no_decay=None)
    theirs = build_optimizer("adamw", groups()[0], **ADAM, no_decay=None)
    kwargs = {"num_cycles": 3, "power": 2.0}
    schedule = build_scheduler(name, ours, warmup_steps=4, total_steps=30, **kwargs)
    reference = get_scheduler(name, theirs, num_warmup_steps=4, num_training_steps=30, **kwargs)
    curve, expected = [], []
    for _ in range(32):
        curve.append(schedule.get_last_lr())
        expected.append(reference.get_last_lr())
        ours.step(), theirs.step(), schedule.step(), reference.step()
    assert curve == expected
    assert len({tuple(lrs) for lrs in curve}) > 1 or name == "constant"


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="adamw, adamw8bit, prodigy, adafactor"):
        build_optimizer("sgd", groups()[0], **ADAM, no_decay=None)
    optimizer = build_optimizer("adamw", groups()[0], **ADAM, no_decay=None)
    with pytest.raises(ValueError, match="cosine_with_restarts"):
        build_scheduler("piecewise_constant", optimizer, warmup_steps=0, total_steps=10)
    assert OPTIMIZERS == ("adamw", "adamw8bit", "prodigy", "adafactor")


@pytest.mark.parametrize(("name", "package"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_missing_package_says_what_to_install(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail, installed or not
    with pytest.raises(MissingPackageError, match=f"optimizer '{name}' needs the '{package}' package") as info:
        build_optimizer(name, groups()[0], **ADAM, no_decay=None)
    assert f"pip install {package}" in str(info.value)


def adapters_of(kind: str) -> dict:
    """Two UNet layers and one per text encoder, of ``kind`` (lora, dora, vera, dvora), like inject_network's."""
    spec = AdapterSpec(rank=4, alpha=4.0, dora=kind in ("dora", "dvora"), vera=kind in ("vera", "dvora"))
    projections = projections_for(0, [(4, 8, 6)]) if spec.vera else None

    def layers(count: int) -> dict:
        return {f"stem{i}": make_adapter(nn.Linear(8, 6), spec, projections=projections) for i in range(count)}

    return {"unet": layers(2), "te1": layers(1), "te2": layers(1)}


def lrs_by_parameter(settings, adapters) -> dict[str, float]:
    """Each adapter parameter's lr in the run's optimizer, by part/stem/name."""
    optimizer, _ = run_optimizer(settings, adapters, total_steps=10)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {
        f"{part}/{stem}/{name}": lr_of[id(param)]
        for part, layers in adapters.items()
        for stem, layer in layers.items()
        for name, param in layer.named_parameters(recurse=False)
    }


@pytest.mark.parametrize(
    ("kind", "up"), [("lora", "lora_up"), ("dora", "lora_up"), ("vera", "vera_b"), ("dvora", "vera_b")]
)
def test_loraplus_raises_only_the_up_lrs_to_ratio_times_each_parts_own(kind, up):
    adapters = adapters_of(kind)
    lrs = {"learning_rate": 1e-4, "unet_lr": 2e-4, "text_encoder_1_lr": 3e-5}
    plain = lrs_by_parameter(OptimizerSettings(**lrs), adapters)
    plus = lrs_by_parameter(OptimizerSettings(**lrs, loraplus_ratio=16.0), adapters)
    assert plain.keys() == plus.keys()
    raised = {key for key in plus if plus[key] != plain[key]}
    assert raised == {key for key in plus if key.endswith(f"/{up}")}  # magnitudes, down and VeRA's d keep the lr
    assert all(plus[key] == 16.0 * plain[key] for key in raised)
    assert {plain[f"{part}/stem0/{up}"] for part in ("unet", "te1", "te2")} == {2e-4, 3e-5, 1e-4}


def test_loraplus_groups_are_named_for_the_logs_and_keep_the_no_decay_twin():
    adapters = adapters_of("dora")
    optimizer, _ = run_optimizer(OptimizerSettings(loraplus_ratio=4.0, weight_decay=0.1), adapters, total_steps=10)
    summary = [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert summary[:3] == [("unet", 1e-4, 0.1), ("unet/no_decay", 1e-4, 0.0), ("unet/up", 4e-4, 0.1)]
    assert [g["name"] for g in optimizer.param_groups][3:] == [
        "text_encoder_1", "text_encoder_1/no_decay", "text_encoder_1/up",
        "text_encoder_2", "text_encoder_2/no_decay", "text_encoder_2/up",
    ]  # fmt: skip
    magnitudes = {id(layer.dora_scale) for layer in adapters["unet"].values()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == magnitudes


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_loraplus_off_or_one_gives_the_same_groups_as_without(ratio):
    adapters = adapters_of("dora")

    def summary(settings) -> list:
        optimizer, _ = run_optimizer(settings, adapters, total_steps=10)
        return [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]

    assert summary(OptimizerSettings(loraplus_ratio=ratio)) == summary(OptimizerSettings())


def test_loraplus_with_prodigy_names_the_setting_before_any_model_loads():
    settings = {"dataset": {"path": "data"}, "optimizer": {"name": "prodigy", "learning_rate": 1.0}}
    with pytest.raises(ConfigError, match="optimizer.loraplus_ratio: prodigy") as info:
        from_dict({**settings, "optimizer": {**settings["optimizer"], "loraplus_ratio": 16.0}})
    assert [p.where for p in info.value.problems] == ["optimizer.loraplus_ratio"]
    from_dict({**settings, "optimizer": {**settings["optimizer"], "loraplus_ratio": 1.0}})  # 1: LoRA+ is off
