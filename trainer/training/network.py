"""The adapter network of a run, from its settings: which layers of which model get adapters, and what trains.

Adapters are kept per model part (UNet, CLIP-L, OpenCLIP-G) keyed by kohya stem, the names the file uses, so
saving is a walk over them (``training.saving``) and a resume state names each parameter the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.adapters.injection import NetworkSpec, inject_adapters
from trainer.adapters.layers import LoRALayer
from trainer.adapters.norm_group import refresh_norms
from trainer.config.schema import NetworkSettings, TrainConfig
from trainer.errors import ConfigError
from trainer.sdxl.naming import Part

Adapters = dict[Part, dict[str, LoRALayer]]  # part -> kohya stem -> adapter layer


def network_spec(settings: NetworkSettings) -> NetworkSpec:
    """The settings' [network] section as the adapter package takes it."""
    return NetworkSpec(
        dora=settings.has_magnitude,
        rank=settings.rank,
        alpha=settings.alpha,
        conv_rank=settings.conv_rank,
        conv_alpha=settings.conv_alpha,
        dora_axis=settings.dora_axis,
        module_dropout=settings.module_dropout,
        rank_dropout=settings.rank_dropout,
        vera=settings.uses_projections,
        vera_seed=settings.vera_seed,
        vera_d_initial=settings.vera_d_initial,
    )


def inject_network(pipe, config: TrainConfig) -> Adapters:
    """Wrap the targeted layers of the UNet (and the text encoders when they train) in adapters."""
    net = config.network
    spec = network_spec(net)
    models: dict[Part, nn.Module] = {"unet": pipe.unet}
    if net.train_text_encoders:
        models |= {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    adapters: Adapters = {
        part: inject_adapters(model, part, spec, net.unet_targets, net.include, net.exclude)
        for part, model in models.items()
    }
    if not any(adapters.values()):
        raise ConfigError.at("network.include / network.exclude", "they leave no layer to adapt; loosen the patterns")
    return adapters


def trainable_parameters(adapters: Adapters) -> dict[str, nn.Parameter]:
    """Every adapter parameter under a stable name (``unet/<stem>/lora_down``), the resume state's keys."""
    return {
        f"{part}/{stem}/{name}": param
        for part, layers in adapters.items()
        for stem, layer in layers.items()
        for name, param in layer.named_parameters(recurse=False)
    }


def compile_unet(unet: nn.Module, adapters: Adapters) -> None:
    """``training.compile``: torch.compile the UNet in place, so module names (the file's keys) stay as they are.

    Compiled, a DoRA layer reads its norm from the cache unchecked (the check cannot be traced), so a forward
    pre-hook kept out of the compiled graph refreshes the norms first, before every forward: after each
    optimizer step, and for the samples too.
    """
    layers = [layer for part in adapters.values() for layer in part.values()]
    unet.register_forward_pre_hook(torch.compiler.disable(lambda module, args: refresh_norms(layers)))
    unet.compile()
