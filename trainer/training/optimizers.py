"""Optimizers and learning-rate schedules by name, so the config names one and the loop never imports one.

Each ``ParamGroup`` (UNet, each text encoder) keeps its own learning rate and its name, so logs can
show ``lr/<name>``. Parameters the caller marks ``no_decay`` (DoRA magnitudes, which weight decay
would pull toward zero and so shrink the weight norm) go to a twin group with weight decay 0.
Optional optimizer packages are imported only when chosen; a missing one says what to install.
``run_optimizer`` puts a run's adapters into those groups from its settings, with LoRA+'s up matrices in groups
of their own (``optimizer.loraplus_ratio``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import Parameter

from trainer.adapters.layers import DoRALayer
from trainer.config.schema import OPTIMIZERS, SCHEDULERS, OptimizerSettings
from trainer.optional_packages import import_optional
from trainer.sdxl.naming import Part

from .network import Adapters

PART_GROUP_NAMES: dict[Part, str] = {"unet": "unet", "te1": "text_encoder_1", "te2": "text_encoder_2"}
PART_LR_SETTINGS: dict[Part, str] = {"unet": "unet_lr", "te1": "text_encoder_1_lr", "te2": "text_encoder_2_lr"}
# The parameters LoRA+ trains at ratio x the lr: the output-side factor that starts at zero. LoRA's and DoRA's
# lora_up (kohya's rule: "lora_up" in the name); VeRA's and DVoRA's b, which scales B's rows (up = diag(b) B) and
# starts at zero as lora_up does, while d scales A's (down's) rows and so keeps the lr, as lora_down does.
# DoRA's magnitude keeps the lr too, as in kohya and LyCORIS (PEFT's LoRA+ would raise every 1-D parameter).
LORAPLUS_UP_PARAMETERS = frozenset({"lora_up", "vera_b"})


@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained with one learning rate; ``name`` ("unet", "text_encoder_1", ...) labels its lr in logs."""

    name: str
    params: list[Parameter]
    lr: float


def build_optimizer(
    name: str,
    groups: Sequence[ParamGroup],
    *,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    no_decay: Callable[[Parameter], bool] | None,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` with one param group per non-empty ``ParamGroup`` (plus its no-decay twin).

    Prodigy estimates the step size itself and treats ``lr`` as a multiplier, so it is usually run with lr 1.0
    (the lr given here is used as is), and it needs one lr for all groups. Adafactor runs with a fixed
    (scheduled) lr; Adam's ``betas`` and ``eps`` mean something else there, so Adafactor keeps its own
    defaults for those.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    torch_groups = _torch_param_groups(groups, weight_decay, no_decay)
    if not torch_groups:
        raise ValueError("no parameters to train: every ParamGroup is empty")
    params = [p for group in torch_groups for p in group["params"]]
    # The optimizer-wide lr is only a default (each group sets its own), but diffusers' polynomial
    # schedule reads it as its reference lr, so it is the first group's rather than a library default.
    lr = torch_groups[0]["lr"]

    if name == "adamw":
        kernels = adamw_kernels(params) if fused is None else {"fused": fused or None}
        if not kernels["fused"]:
            for group in torch_groups:
                group.update(foreach=_is_small(group["params"]) or None)
        return torch.optim.AdamW(torch_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernels)
    if name == "adamw8bit":
        bnb = import_optional("bitsandbytes", feature=f"optimizer {name!r}")
        return bnb.optim.AdamW8bit(torch_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "prodigy":
        prodigyopt = import_optional("prodigyopt", feature=f"optimizer {name!r}")
        # Prodigy estimates one step size for all groups and refuses, at the first step, groups whose lr
        # differ (0 excepted, meaning frozen): said here, before any model is loaded.
        if len({g["lr"] for g in torch_groups} - {0.0}) > 1:
            raise ValueError(
                "prodigy needs the same lr for every group (conventionally 1.0; 0 freezes a group), "
                f"got {', '.join(f'{g.name}={g.lr}' for g in groups if g.params)}"
            )
        return prodigyopt.Prodigy(torch_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    from transformers.optimization import (
        Adafactor,  # a hard dependency, imported late because it is slow
    )

    # relative_step/scale_parameter off: otherwise Adafactor ignores lr and computes its own step size.
    return Adafactor(
        torch_groups, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False
    )


def adamw_kernels(params: Sequence[torch.Tensor]) -> dict[str, bool | None]:
    """How AdamW runs over ``params`` in training: the fused kernel on CUDA; elsewhere PyTorch's loop over
    tensors, except for a param group of small tensors (``build_optimizer``: DoRA's magnitudes).

    Measured on CPU over the tiny UNet's 2,166 DoRA tensors (bench/adapter_step.py's tiny_unet): the loop
    59 ms a step, the multi-tensor (foreach) form 40 ms, the fused kernel 12 ms. Neither is taken for all
    tensors: with the fused one a resumed run drifts from an uninterrupted one in the last bits
    (tests/test_training.py), and the foreach one makes temporaries the size of all its tensors at once.
    """
    return {"fused": True if all(p.device.type == "cuda" for p in params) else None}


# A param group whose tensors hold at most this much runs AdamW's multi-tensor (foreach) form off CUDA: its
# temporaries are the group's size, which is small here. DoRA's magnitudes are one such group (5 MB on SDXL's
# UNet, one tensor per layer), and PyTorch's loop costs ~30 us per tensor on CPU: 722 magnitudes ~20 ms -> ~12 ms.
FOREACH_GROUP_BYTES = 16 * 2**20


def _is_small(params: Sequence[torch.Tensor]) -> bool:
    return sum(p.numel() * p.element_size() for p in params) <= FOREACH_GROUP_BYTES


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule ``name``, stepped once per optimizer step; it scales every group's own lr."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )


def _torch_param_groups(
    groups: Sequence[ParamGroup], weight_decay: float, no_decay: Callable[[Parameter], bool] | None
) -> list[dict[str, Any]]:
    torch_groups = []
    for group in groups:
        skip_decay = [bool(no_decay and no_decay(p)) for p in group.params]
        decayed = [p for p, skip in zip(group.params, skip_decay) if not skip]
        undecayed = [p for p, skip in zip(group.params, skip_decay) if skip]
        for suffix, params, decay in (("", decayed, weight_decay), ("/no_decay", undecayed, 0.0)):
            if params:
                torch_groups.append(
                    {"name": group.name + suffix, "params": params, "lr": group.lr, "weight_decay": decay}
                )
    return torch_groups


def part_groups(settings: OptimizerSettings, adapters: Adapters) -> list[ParamGroup]:
    """One group per model part at its own lr (or ``learning_rate``); with LoRA+ (``loraplus_ratio`` > 0, != 1),
    each part's up parameters (``LORAPLUS_UP_PARAMETERS``) in a twin group "<part>/up" at ratio x that lr.

    LoRA+ (Hayou et al. 2024, kohya's ``loraplus_lr_ratio``): with one lr for both factors, the zero-initialised
    up factor learns too slowly for wide layers; a larger lr for it alone fixes that at no cost.
    """
    ratio = settings.loraplus_ratio
    split = ratio not in (0.0, 1.0)  # prodigy with LoRA+ is refused with the other settings (TrainConfig.problems)
    groups = []
    for part, layers in adapters.items():
        lr = getattr(settings, PART_LR_SETTINGS[part]) or settings.learning_rate
        rest, ups = [], []
        for layer in layers.values():
            for name, param in layer.named_parameters(recurse=False):
                (ups if split and name in LORAPLUS_UP_PARAMETERS else rest).append(param)
        groups.append(ParamGroup(PART_GROUP_NAMES[part], rest, lr))
        if ups:
            groups.append(ParamGroup(f"{PART_GROUP_NAMES[part]}/up", ups, lr * ratio))
    return groups


def run_optimizer(settings: OptimizerSettings, adapters: Adapters, total_steps: int, fused: bool | None = None):
    """(optimizer, lr schedule) of a run: the groups of ``part_groups``.

    DoRA magnitudes are never weight-decayed: decay would pull ||W'|| toward zero. ``fused``: AdamW's fused
    kernel (default: on CUDA); the memory estimate counts a CUDA run's.
    """
    groups = part_groups(settings, adapters)
    magnitudes = {
        id(layer.dora_scale)
        for layers in adapters.values()
        for layer in layers.values()
        if isinstance(layer, DoRALayer)
    }
    optimizer = build_optimizer(
        settings.name,
        groups,
        weight_decay=settings.weight_decay,
        betas=tuple(settings.betas),
        eps=settings.eps,
        no_decay=lambda p: id(p) in magnitudes,
        fused=fused,
    )
    scheduler = build_scheduler(
        settings.scheduler, optimizer, warmup_steps=settings.warmup_steps, total_steps=total_steps
    )
    return optimizer, scheduler
