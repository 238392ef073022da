"""Put adapters into the SDXL UNet and text encoders, and take them out again.

Which modules are targeted (docs/adapter-format.md section 3) is decided by ``trainer.sdxl.naming``; this module only
wraps them, keyed by kohya stem, and restores the original modules on removal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainer.sdxl.naming import (
    Part,
    attention_module_paths,
    conv_module_paths,
    stem_for,
    text_encoder_module_paths,
)

from .dora_norm import DoraAxis
from .layers import AdaptableModule, AdapterSpec, DoRALayer, LoRALayer
from .norm_group import DoRANormGroup
from .quantized import weight_info
from .vera import DVoRALayer, SharedProjections, VeRALayer, projections_for
from .weights import AdapterWeights

UnetTargets = Literal["attn", "attn+conv"]
UNET_TARGETS: tuple[UnetTargets, ...] = ("attn", "attn+conv")


@dataclass(frozen=True)
class NetworkSpec:
    """The adapter settings shared by every targeted layer."""

    dora: bool = True
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int | None = None  # for kernels larger than 1x1; None means the same as rank
    conv_alpha: float | None = None  # None means the same as alpha
    dora_axis: DoraAxis = "input"
    module_dropout: float = 0.0
    rank_dropout: float = 0.0
    vera: bool = False  # factors from shared random projections: VeRA, or DVoRA with dora
    vera_seed: int = 0  # the projections' seed, recorded in the file
    vera_d_initial: float = 0.1

    def spec_for(self, module: nn.Module) -> AdapterSpec:
        """kohya's rule: 3x3 (and larger) convs use conv_rank/conv_alpha, Linear and 1x1 use rank/alpha."""
        spatial = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        rank = (self.conv_rank or self.rank) if spatial else self.rank
        alpha = (self.conv_alpha if self.conv_alpha is not None else self.alpha) if spatial else self.alpha
        return AdapterSpec(
            rank=rank,
            alpha=alpha,
            dora=self.dora,
            dora_axis=self.dora_axis,
            module_dropout=self.module_dropout,
            rank_dropout=self.rank_dropout,
            vera=self.vera,
            vera_d_initial=self.vera_d_initial,
        )


def target_module_paths(model: nn.Module, part: Part, unet_targets: UnetTargets = "attn") -> list[str]:
    """Module paths (as the model names them) that ``unet_targets`` ("attn" or "attn+conv") picks in one part."""
    if part != "unet":
        return text_encoder_module_paths(model)
    if unet_targets not in UNET_TARGETS:
        raise ValueError(f"unknown network.unet_targets {unet_targets!r}; choose one of {UNET_TARGETS}")
    paths = attention_module_paths(model)
    return paths + conv_module_paths(model) if unet_targets == "attn+conv" else paths


def select_targets(
    model: nn.Module,
    part: Part,
    unet_targets: UnetTargets = "attn",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> dict[str, str]:
    """Stem -> module path after include/exclude regexes (``re.search`` on the stem).

    With include patterns, a stem must match at least one; a stem matching any exclude pattern is dropped.
    """
    include_res = [re.compile(p) for p in include]
    exclude_res = [re.compile(p) for p in exclude]
    selected: dict[str, str] = {}
    for path in target_module_paths(model, part, unet_targets):
        stem = stem_for(part, path)
        if include_res and not any(r.search(stem) for r in include_res):
            continue
        if any(r.search(stem) for r in exclude_res):
            continue
        selected[stem] = path
    return selected


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def inject_adapters(
    model: nn.Module,
    part: Part,
    network: NetworkSpec,
    unet_targets: UnetTargets = "attn",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALayer]:
    """Wrap every selected module of ``model`` in place; returns stem -> adapter layer."""
    paths = select_targets(model, part, unet_targets, include, exclude)
    bases = {stem: model.get_submodule(path) for stem, path in paths.items()}
    for path, base in zip(paths.values(), bases.values()):
        if isinstance(base, LoRALayer):
            raise RuntimeError(f"{path} already has an adapter; remove_adapters() first")
    projections = _shared_projections(network, bases.values()) if network.vera and bases else None
    adapters: dict[str, LoRALayer] = {}
    for stem, base in bases.items():
        layer = make_adapter(base, network.spec_for(base), dtype, projections)
        _replace_module(model, paths[stem], layer)
        adapters[stem] = layer
    DoRANormGroup(layer for layer in adapters.values() if isinstance(layer, DoRALayer))
    return adapters


def make_adapter(
    base: AdaptableModule,
    spec: AdapterSpec,
    dtype: torch.dtype = torch.float32,
    projections: SharedProjections | None = None,
) -> LoRALayer:
    """The adapter class the spec asks for, wrapped around ``base``; VeRA kinds slice ``projections``."""
    if not spec.vera:
        return (DoRALayer if spec.dora else LoRALayer)(base, spec, dtype)
    if projections is None:
        raise ValueError("a VeRA or DVoRA adapter needs the part's shared projections")
    return (DVoRALayer if spec.dora else VeRALayer)(base, spec, projections, dtype)


def _shared_projections(network: NetworkSpec, bases: Iterable[AdaptableModule]) -> SharedProjections:
    """One pair of VeRA projections for a part, just large enough for every layer it adapts (as PEFT sizes them)."""
    layers = []
    for base in bases:
        (out_ch, in_ch, *kernel), _, device = weight_info(base)
        layers.append((network.spec_for(base).rank, math.prod((in_ch, *kernel)), out_ch))
    return projections_for(network.vera_seed, layers, device)


def remove_adapters(model: nn.Module) -> int:
    """Unmerge and unwrap every adapter layer in ``model``; returns how many were removed."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALayer)]
    for path, layer in found:
        _replace_module(model, path, layer.restore_base())
    return len(found)


def adapter_weights(adapters: Mapping[str, LoRALayer]) -> dict[str, AdapterWeights]:
    """What the file stores, per stem."""
    return {stem: layer.to_weights() for stem, layer in adapters.items()}
