"""``network.init_from``: a new run that starts from an existing adapter file's weights instead of from zero.

Not a resume: the schedule, the optimizer and the data order start afresh; only the adapter's starting weights
come from the file (kohya, LyCORIS, OneTrainer, PEFT-named or ours; ``kohya.adapter_file.load_adapter``).
What the run starts from is the file's own merged weight, so every rule below either keeps it exact or refuses:

- Every layer in the file must be one the run adapts: a layer left out would silently change the starting
  model. A stem no SDXL module has, or whose shapes do not fit it, means a file for another model (SD1.5...);
  a stem of a layer the run does not adapt names the settings that would adapt it. A file with keys the
  reader cannot use (LoHa, LoKr, Tucker convs, embeddings) is refused for the same reason.
- Layers the run adapts but the file lacks keep their fresh init (a zero update), listed in one warning: the
  usual case of widening a run (convolutions, text encoders) over an attention-only file.
- The rank must be the run's (``network.rank``, or ``network.conv_rank`` for 3x3 convs): a rank cannot grow
  without changing what trains, and cutting it is ``dora-studio resize``'s job, with its error measured.
- alpha may differ from ``network.alpha``: up is rescaled by alpha_file / alpha_run (the ranks agree), so
  gamma * up @ down is the file's (to float rounding; exactly when the alphas agree) and the run trains and
  saves at its own alpha. up rather than both factors: down keeps the input projection as the file has it, and
  up is the factor that carries the update's size (it starts at zero in a fresh run).
- LoRA -> LoRA and DoRA -> DoRA copy (the DoRA axis must match ``network.dora_axis``: moving magnitudes to
  the other axis is not exact, ``dora-studio convert`` does it with its error measured). LoRA -> DoRA keeps
  the factors and sets each magnitude to ||W + gamma up down|| along the run's axis (``kohya.convert``'s
  ``lora_to_dora``), so the merged weight is the LoRA's; over a quantized base W is the dequantized weight the
  layer trains on. DoRA -> LoRA is refused: a LoRA cannot hold the magnitudes (``dora-studio convert``
  approximates them at a rank).
- VeRA / DVoRA runs start only from a VeRA / DVoRA file whose shared projections are the run's (same seed
  and sizes): their vectors are read back from the factors (``adapters.vera.recover_vectors``). A VeRA file
  starts a LoRA run (and a DVoRA file a DoRA run) as the plain file it also is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from trainer.adapters.layers import DoRALayer, LoRALayer
from trainer.adapters.quantized import frozen_weight, weight_info
from trainer.adapters.weights import AdapterWeights
from trainer.config.schema import NetworkSettings
from trainer.errors import ConfigError
from trainer.kohya.adapter_file import LoadedAdapter, load_adapter
from trainer.kohya.convert import lora_to_dora
from trainer.kohya.merge import canonical_stems, model_stem_targets, pipeline_parts
from trainer.kohya.vera_file import read_vera_file
from trainer.sdxl.naming import parse_stem_part

from .network import Adapters

log = logging.getLogger("dora_studio")

SETTING = "network.init_from"
EXAMPLES = 3  # stems named in a message; the count says how many more


def init_from_file(path: Path, pipe, adapters: Adapters, net: NetworkSettings) -> None:
    """Load ``path`` into the run's freshly injected ``adapters`` (of ``pipe``), by the rules of this module;
    every layer is checked before any is written."""
    loaded = canonical_stems(load_adapter(path), {"unet": pipe.unet})
    layers = {stem: layer for part in adapters.values() for stem, layer in part.items()}
    _check_stems(path, loaded, layers, pipe, net)
    if net.uses_projections:
        _check_projections(path, loaded, adapters, net)
    starts = {stem: _start_weights(path, stem, weights, layers[stem], net) for stem, weights in loaded.adapters.items()}
    for stem, weights in starts.items():
        layers[stem].load_weights(weights)
    fresh = sorted(layers.keys() - starts.keys())
    log.info("%s: %d layers start from %s", SETTING, len(starts), path)
    if fresh:
        log.warning(
            "%s: %d adapted layers are not in the file and start from zero: %s", SETTING, len(fresh), _some(fresh)
        )


def _some(stems: list[str]) -> str:
    more = len(stems) - EXAMPLES
    return ", ".join(stems[:EXAMPLES]) + (f" and {more} more" if more > 0 else "")


def _check_stems(
    path: Path, loaded: LoadedAdapter, layers: Mapping[str, LoRALayer], pipe, net: NetworkSettings
) -> None:
    """Refuse unreadable keys, layers of another model, and layers the run does not adapt (see the module)."""
    if loaded.unknown_keys:
        raise ConfigError.at(
            SETTING,
            f"{path} holds {len(loaded.unknown_keys)} keys that are not LoRA/DoRA layers "
            f"({_some(loaded.unknown_keys)}: LoHa, LoKr, Tucker convs, embeddings...), and a run continues every "
            "layer of the file it starts from: choose a LoRA/DoRA file",
        )
    misfit = sorted(stem for stem, w in loaded.adapters.items() if stem in layers and not _fits(w, layers[stem]))
    model_stems = layers.keys() | model_stem_targets(pipeline_parts(pipe)).keys()
    foreign = sorted(loaded.adapters.keys() - model_stems) + misfit
    if foreign:
        raise ConfigError.at(
            SETTING,
            f"{path} does not fit this SDXL model: {len(foreign)} of its layers are not in it or have other "
            f"shapes ({_some(foreign)}); is it an adapter for another architecture (SD1.5, SD3, Flux)? Choose an "
            "SDXL adapter file",
        )
    not_adapted = sorted(loaded.adapters.keys() - layers.keys())
    if not_adapted:
        parts = {parse_stem_part(stem) for stem in not_adapted}
        fixes = ['network.unet_targets = "attn+conv"'] if "unet" in parts else []
        fixes += ["network.train_text_encoders = true"] if parts - {"unet"} and not net.train_text_encoders else []
        raise ConfigError.at(
            SETTING,
            f"{path} has {len(not_adapted)} layers this run does not adapt ({_some(not_adapted)}), and a run "
            f"continues every layer of the file it starts from: set {', '.join([*fixes, ''])}or loosen "
            "network.include / network.exclude, so that the run adapts them",
        )


def _fits(weights: AdapterWeights, layer: LoRALayer) -> bool:
    """The file's layer has the run layer's shapes, rank aside (checked on its own, with its own fix)."""
    return weights.down.shape[1:] == layer.down_shape[1:] and weights.up.shape[0] == layer.up_shape[0]


def _check_projections(path: Path, loaded: LoadedAdapter, adapters: Adapters, net: NetworkSettings) -> None:
    """A VeRA / DVoRA run needs a VeRA / DVoRA file drawn from the very projections the run draws."""
    vera = read_vera_file(loaded, str(path))
    if vera is None:
        raise ConfigError.at(
            SETTING,
            f"{path} is not a VeRA/DVoRA file (it has no dora_studio.vera record), and a {net.kind} run's "
            'factors must be scalings of its shared random matrices: start a network.kind = "lora" or "dora" '
            "run from it, or leave network.init_from empty",
        )
    for part, layers in adapters.items():
        if not layers or part not in vera.projections:
            continue
        ours, theirs = next(iter(layers.values())).vera_projections.describe(), vera.projections[part].describe()
        if ours != theirs:
            raise ConfigError.at(
                "network.vera_seed",
                f"{path} was trained over other {part} projections (seed {theirs['seed']}, rank {theirs['rank']}, "
                f"{theirs['in_features']} in, {theirs['out_features']} out) than this run draws (seed "
                f"{ours['seed']}, rank {ours['rank']}, {ours['in_features']} in, {ours['out_features']} out): set "
                f"network.vera_seed = {theirs['seed']}, network.rank = {theirs['rank']}, and adapt the layers "
                "the file's run adapted (the largest of them sizes the projections)",
            )


def _start_weights(
    path: Path, stem: str, weights: AdapterWeights, layer: LoRALayer, net: NetworkSettings
) -> AdapterWeights:
    """The file's layer as this run's layer will hold it: at the run's alpha, with a magnitude for DoRA."""
    spatial = any(size != 1 for size in layer.down_shape[2:])
    prefix = "network.conv_" if spatial else "network."  # kohya's rule: 3x3 convs have their own rank and alpha
    rank_setting, alpha_setting = prefix + "rank", prefix + "alpha"
    rank = layer.spec.rank
    if weights.rank != rank:
        fix = (
            f"{weights.rank}, or cut the file to rank {rank} with `dora-studio resize {path} --rank {rank} --out NEW`"
            if weights.rank > rank
            else f"{weights.rank} (a file's rank cannot be raised)"
        )
        raise ConfigError.at(
            rank_setting, f"{path} has rank {weights.rank} at {stem} but {rank_setting} is {rank}: set it to {fix}"
        )
    is_dora_run = isinstance(layer, DoRALayer)
    if weights.is_dora and not is_dora_run:
        raise ConfigError.at(
            "network.kind",
            f"{path} is a DoRA file ({stem} has a magnitude) and a {net.kind} run cannot hold its magnitudes: set "
            f'network.kind = "{"dvora" if net.uses_projections else "dora"}", or convert the file first with '
            f"`dora-studio convert {path} --to lora --model MODEL --out NEW`",
        )
    if weights.is_dora and weights.dora_axis != layer.spec.dora_axis:
        raise ConfigError.at(
            "network.dora_axis",
            f"{path} has {weights.dora_axis}-axis magnitudes ({stem}) but network.dora_axis is "
            f'"{layer.spec.dora_axis}": set it to "{weights.dora_axis}", or convert the file with '
            f"`dora-studio convert {path} --to dora --axis {layer.spec.dora_axis} --model MODEL --out NEW`",
        )
    device = weight_info(layer.base)[2]  # VeRA reads its vectors back against projections on this device
    weights = replace(weights, down=weights.down.to(device), up=weights.up.to(device))
    if is_dora_run and not weights.is_dora:
        # over a quantized base, W is dequantized: the weight the layer's forward sees
        weights = lora_to_dora(weights, frozen_weight(layer.base), layer.spec.dora_axis)
    alpha = layer.spec.alpha
    if math.isclose(weights.alpha, alpha, rel_tol=1e-6):
        return replace(weights, alpha=alpha)
    if alpha == 0:
        raise ConfigError.at(alpha_setting, f"0 scales every update to zero, so {path} cannot start this run")
    return replace(weights, up=weights.up * (weights.alpha / alpha), alpha=alpha)
