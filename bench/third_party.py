"""The independent implementations the benches compare against, put on the same target Linears as ours, and the
optimizer every method is timed with.

PEFT's LoRA / DoRA / VeRA and LyCORIS's DoRA, each given an explicit list of module paths, so that every method
adapts exactly the layers our injection picks.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.training.optimizers import ParamGroup, build_optimizer

MAGNITUDE_NAMES = ("dora_scale", "lora_magnitude_vector")  # ours and LyCORIS's; PEFT's


def training_adamw(params: list[nn.Parameter], modules: list[nn.Module]) -> torch.optim.Optimizer:
    """AdamW built as a training run builds it (``build_optimizer``, the settings' defaults), for every method
    alike: the DoRA magnitudes found in ``modules`` (ours, PEFT's, LyCORIS's) in their own undecayed group, and
    the kernels training picks for each group."""
    magnitudes = {
        id(p) for module in modules for name, p in module.named_parameters() if any(n in name for n in MAGNITUDE_NAMES)
    }
    return build_optimizer(
        "adamw",
        [ParamGroup("adapters", params, 1e-4)],
        weight_decay=0.01,
        betas=(0.9, 0.999),
        eps=1e-8,
        no_decay=lambda p: id(p) in magnitudes,
    )


def apply_peft(model: nn.Module, targets: list[str], rank: int, alpha: float, dora: bool) -> None:
    """PEFT's LoRA (or DoRA: ``use_dora``) on ``targets``, in place; its parameters are left trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_dora=dora)
    inject_adapter_in_model(config, model)


def apply_peft_vera(model: nn.Module, targets: list[str], rank: int, seed: int = 0) -> None:
    """PEFT's VeRA on ``targets``, in place (its own init: d = 0.1, b = 0; the shared matrices from ``seed``).

    PEFT keeps VeRA's shared matrices on its tuner, which ``inject_adapter_in_model`` refuses; the tuner is built
    directly and kept on the model as a plain attribute (not a submodule: it holds the model itself).
    """
    from peft import VeraConfig
    from peft.tuners.vera import VeraModel

    config = VeraConfig(r=rank, target_modules=targets, projection_prng_key=seed, vera_dropout=0.0)
    object.__setattr__(model, "peft_vera_tuner", VeraModel(model, config, "default"))


def apply_lycoris_dora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> nn.Module:
    """LyCORIS's DoRA (``weight_decompose``, its output axis) on ``targets``; returns the network, which is
    not a submodule of ``model``: the caller keeps it alive and trains its parameters."""
    from lycoris import LycorisNetwork

    # Only the named Linears: no class targets; fnmatch of a name without wildcards is plain equality.
    LycorisNetwork.apply_preset(
        {
            "enable_conv": False,
            "target_module": [],
            "target_name": targets,
            "use_fnmatch": True,
            "module_algo_map": {},
            "name_algo_map": {},
            "exclude_name": [],
        }
    )
    # weight_decompose=True is create_lycoris(dora_wd=True); its DoRA axis defaults to the output one.
    network = LycorisNetwork(
        model, multiplier=1.0, lora_dim=rank, alpha=alpha, network_module="lora", weight_decompose=True
    )
    if len(network.loras) != len(targets):
        raise RuntimeError(f"LyCORIS wrapped {len(network.loras)} modules, expected {len(targets)}")
    network.apply_to()
    return network.requires_grad_(True)
