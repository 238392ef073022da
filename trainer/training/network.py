"""The adapter network of a run: which layers get adapters, what trains, and how it is saved to a file.

Adapters are kept per model part (UNet, CLIP-L, OpenCLIP-G) keyed by kohya stem, the same names the
file uses, so saving is a rename-free walk over them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from trainer.kohya.adapter_file import build_metadata, save_adapter
from trainer.config.schema import TrainConfig
from trainer.adapters.injection import NetworkSpec, adapter_weights, inject_adapters
from trainer.adapters.layers import DoRALayer, LoRALayer
from trainer.sdxl.naming import Part

SAVE_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PART_LR_SETTINGS: dict[Part, str] = {"unet": "unet_lr", "te1": "text_encoder_1_lr", "te2": "text_encoder_2_lr"}
PART_GROUP_NAMES: dict[Part, str] = {"unet": "unet", "te1": "text_encoder_1", "te2": "text_encoder_2"}

Adapters = dict[Part, dict[str, LoRALayer]]


def network_spec(config: TrainConfig) -> NetworkSpec:
    net = config.network
    return NetworkSpec(
        dora=net.kind == "dora", rank=net.rank, alpha=net.alpha, conv_rank=net.conv_rank, conv_alpha=net.conv_alpha,
        dora_axis=net.dora_axis, module_dropout=net.module_dropout, rank_dropout=net.rank_dropout,
    )


def inject_network(pipe, config: TrainConfig) -> Adapters:
    """Wrap the targeted layers of the UNet (and the text encoders when they train) in adapters."""
    spec, net = network_spec(config), config.network
    models: dict[Part, nn.Module] = {"unet": pipe.unet}
    if net.train_text_encoders:
        models |= {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    adapters: Adapters = {}
    for part, model in models.items():
        adapters[part] = inject_adapters(model, part, spec, net.unet_targets, net.include, net.exclude)
    if not any(adapters.values()):
        raise ValueError("network.include / network.exclude leave no layer to adapt; loosen the patterns")
    return adapters


def trainable_parameters(adapters: Adapters) -> dict[str, nn.Parameter]:
    """Every adapter parameter under a stable name (``unet/<stem>/lora_down``), the state's keys."""
    return {
        f"{part}/{stem}/{name}": param
        for part, layers in adapters.items() for stem, layer in layers.items()
        for name, param in layer.named_parameters(recurse=False)
    }


def magnitude_parameter_ids(adapters: Adapters) -> set[int]:
    """ids of the DoRA magnitudes, kept out of weight decay: decay would pull ||W'|| toward zero."""
    return {id(layer.dora_scale) for layers in adapters.values() for layer in layers.values()
            if isinstance(layer, DoRALayer)}


def tag_frequency(captions_by_folder: Mapping[str, list[str]], separator: str) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder, how often each tag appears."""
    return {
        folder: dict(Counter(tag.strip() for caption in captions for tag in caption.split(separator) if tag.strip()))
        for folder, captions in captions_by_folder.items()
    }


def save_network(
    path: Path, adapters: Adapters, config: TrainConfig, *, steps: int, epoch: int, started_at: float,
    dataset_dirs: Mapping[str, Mapping[str, int]], tag_frequencies: Mapping[str, Mapping[str, int]],
) -> None:
    """The kohya file front ends load, with kohya's metadata (FORMAT.md), written atomically."""
    net, opt = config.network, config.optimizer
    weights = {stem: w for layers in adapters.values() for stem, w in adapter_weights(layers).items()}
    has_conv = net.unet_targets == "attn+conv"
    metadata = build_metadata(
        network_kind=net.kind, dim=net.rank, alpha=net.alpha,
        conv_dim=net.conv_rank if has_conv else None, conv_alpha=net.conv_alpha if has_conv else None,
        dora_axis=net.dora_axis if net.kind == "dora" else None, output_name=config.saving.output_name,
        base_model_name=Path(config.model.path).name, steps=steps, epoch=epoch, started_at=started_at,
        finished_at=time.time(), mixed_precision=config.training.mixed_precision,
        learning_rate=opt.learning_rate, unet_lr=opt.unet_lr or opt.learning_rate,
        text_encoder_lr=(opt.text_encoder_1_lr or opt.learning_rate) if net.train_text_encoders else None,
        tag_frequency=tag_frequencies, dataset_dirs=dataset_dirs,
        resolution=(config.dataset.resolution, config.dataset.resolution), title=config.saving.output_name,
        prediction_type="v" if config.model.prediction_type == "v_prediction" else "epsilon",
        extra={"dora_studio.network": json.dumps({"unet_targets": net.unet_targets, "include": net.include,
                                                  "exclude": net.exclude})},
    )
    save_adapter(path, weights, metadata, SAVE_DTYPE_NAMES[config.saving.save_dtype])
