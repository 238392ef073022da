"""Kohya stem names (docs/adapter-format.md section 2) and the modules they name (section 3).

A stem is ``lora_unet_`` + the UNet module path in the original SGM layout, or ``lora_te1_`` /
``lora_te2_`` + the HF CLIP path starting with ``text_model.``, with dots replaced by underscores.
Front ends find the layer a file adapts by this name alone, so the mapping is written once here and
checked against diffusers' own SGM->diffusers converter in the tests. The target-selection helpers
live here too because a target list is only meaningful together with the names it produces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, get_args

from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

Part = Literal["unet", "te1", "te2"]
PARTS: tuple[Part, ...] = get_args(Part)
STEM_PREFIXES: dict[Part, str] = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}

# SDXL's block layout: 3 levels of 2 down / 3 up resnets. Which levels carry attentions decides
# the SGM slot of a sampler, so it is fixed here rather than guessed from a path.
NUM_LEVELS = 3
DOWN_RESNETS = 2
UP_RESNETS = 3
DOWN_LEVELS_WITH_ATTENTION = (1, 2)
UP_LEVELS_WITH_ATTENTION = (0, 1)
DOWNSAMPLER_LEVELS = (0, 1)

# Inside a resnet; dropout has a slot in SGM too. The shared ``nonlinearity`` has no single SGM name.
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "dropout": "out_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_SGM = {sgm: diffusers for diffusers, sgm in _RESNET_TO_SGM.items()}

# Top-level modules outside the blocks (names with no children path).
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding": "time_embed",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.act": "time_embed.1",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding": "label_emb.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.act": "label_emb.0.1",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_act": "out.1",
    "conv_out": "out.2",
}
_TOP_FROM_SGM = {sgm: diffusers for diffusers, sgm in _TOP_TO_SGM.items()}

_DIFFUSERS_BLOCK = re.compile(
    r"(?P<side>down_blocks|up_blocks)\.(?P<i>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
    r"\.(?P<j>\d+)(?P<rest>(\..+)?)$"
)
_DIFFUSERS_MID = re.compile(r"mid_block\.(?P<kind>resnets|attentions)\.(?P<j>\d+)(?P<rest>(\..+)?)$")
_SGM_BLOCK = re.compile(r"(?P<side>input_blocks|output_blocks)\.(?P<n>\d+)\.(?P<slot>\d+)(?P<rest>(\..+)?)$")
_SGM_MID = re.compile(r"middle_block\.(?P<n>\d+)(?P<rest>(\..+)?)$")

_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
_TEXT_ENCODER_TARGET = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def _resnet_inner_to_sgm(rest: str, path: str) -> str:
    """Rename the part of a path inside a resnet (``rest`` is empty or starts with a dot)."""
    if not rest:
        return ""
    head, _, tail = rest[1:].partition(".")
    if head not in _RESNET_TO_SGM:
        raise ValueError(f"no SGM name for resnet module {path!r}")
    return "." + _RESNET_TO_SGM[head] + ("." + tail if tail else "")


def _resnet_inner_from_sgm(rest: str, path: str) -> str:
    if not rest:
        return ""
    parts = rest[1:].split(".")
    head = ".".join(parts[:2])
    if head in _RESNET_FROM_SGM:
        return "." + ".".join([_RESNET_FROM_SGM[head], *parts[2:]])
    if parts[0] in _RESNET_FROM_SGM:  # skip_connection
        return "." + ".".join([_RESNET_FROM_SGM[parts[0]], *parts[1:]])
    raise ValueError(f"no diffusers name for SGM resnet module {path!r}")


def _sampler_inner(rest: str, source: str, target: str, path: str) -> str:
    """A sampler holds one conv: ``conv`` in diffusers, ``op`` (down) or ``conv`` (up) in SGM."""
    if not rest:
        return ""
    head, _, tail = rest[1:].partition(".")
    if head != source:
        raise ValueError(f"no counterpart for sampler module {path!r}")
    return "." + target + ("." + tail if tail else "")


def _check_range(value: int, allowed: Iterable[int], what: str, path: str) -> None:
    if value not in allowed:
        raise ValueError(f"{path!r}: {what} {value} is not in SDXL's layout")


def unet_diffusers_to_sgm(path: str) -> str:
    """SGM module path of a diffusers SDXL UNet module path (no ``.weight``); ValueError if none."""
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    match = _DIFFUSERS_MID.match(path)
    if match:
        j, rest = int(match["j"]), match["rest"]
        if match["kind"] == "attentions":
            _check_range(j, (0,), "mid attention", path)
            return f"middle_block.1{rest}"
        _check_range(j, (0, 1), "mid resnet", path)
        return f"middle_block.{2 * j}{_resnet_inner_to_sgm(rest, path)}"
    match = _DIFFUSERS_BLOCK.match(path)
    if not match:
        raise ValueError(f"no SGM name for UNet module {path!r}")
    side, i, kind, j, rest = match["side"], int(match["i"]), match["kind"], int(match["j"]), match["rest"]
    _check_range(i, range(NUM_LEVELS), "level", path)
    if side == "down_blocks":
        if kind == "resnets":
            _check_range(j, range(DOWN_RESNETS), "resnet", path)
            return f"input_blocks.{3 * i + j + 1}.0{_resnet_inner_to_sgm(rest, path)}"
        if kind == "attentions":
            _check_range(i, DOWN_LEVELS_WITH_ATTENTION, "attention level", path)
            _check_range(j, range(DOWN_RESNETS), "attention", path)
            return f"input_blocks.{3 * i + j + 1}.1{rest}"
        if kind == "downsamplers":
            _check_range(i, DOWNSAMPLER_LEVELS, "downsampler level", path)
            _check_range(j, (0,), "downsampler", path)
            return f"input_blocks.{3 * i + 3}.0{_sampler_inner(rest, 'conv', 'op', path)}"
    else:
        if kind == "resnets":
            _check_range(j, range(UP_RESNETS), "resnet", path)
            return f"output_blocks.{3 * i + j}.0{_resnet_inner_to_sgm(rest, path)}"
        if kind == "attentions":
            _check_range(i, UP_LEVELS_WITH_ATTENTION, "attention level", path)
            _check_range(j, range(UP_RESNETS), "attention", path)
            return f"output_blocks.{3 * i + j}.1{rest}"
        if kind == "upsamplers":
            _check_range(j, (0,), "upsampler", path)
            slot = 2 if i in UP_LEVELS_WITH_ATTENTION else 1
            return f"output_blocks.{3 * i + 2}.{slot}{_sampler_inner(rest, 'conv', 'conv', path)}"
    raise ValueError(f"no SGM name for UNet module {path!r}")


def unet_sgm_to_diffusers(path: str) -> str:
    """Diffusers module path of an SGM SDXL UNet module path; the inverse of unet_diffusers_to_sgm."""
    if path in _TOP_FROM_SGM:
        return _TOP_FROM_SGM[path]
    match = _SGM_MID.match(path)
    if match:
        n, rest = int(match["n"]), match["rest"]
        if n == 1:
            return f"mid_block.attentions.0{rest}"
        _check_range(n, (0, 2), "middle_block index", path)
        return f"mid_block.resnets.{n // 2}{_resnet_inner_from_sgm(rest, path)}"
    match = _SGM_BLOCK.match(path)
    if not match:
        raise ValueError(f"no diffusers name for SGM UNet module {path!r}")
    side, n, slot, rest = match["side"], int(match["n"]), int(match["slot"]), match["rest"]
    if side == "input_blocks":
        _check_range(n, range(1, 3 * NUM_LEVELS), "input block", path)
        i, j = divmod(n - 1, 3)
        if j == DOWN_RESNETS:  # the third slot of a level is its downsampler
            _check_range(slot, (0,), "downsampler slot", path)
            _check_range(i, DOWNSAMPLER_LEVELS, "downsampler level", path)
            return f"down_blocks.{i}.downsamplers.0{_sampler_inner(rest, 'op', 'conv', path)}"
        if slot == 0:
            return f"down_blocks.{i}.resnets.{j}{_resnet_inner_from_sgm(rest, path)}"
        _check_range(slot, (1,), "input block slot", path)
        _check_range(i, DOWN_LEVELS_WITH_ATTENTION, "attention level", path)
        return f"down_blocks.{i}.attentions.{j}{rest}"
    _check_range(n, range(3 * NUM_LEVELS), "output block", path)
    i, j = divmod(n, 3)
    has_attention = i in UP_LEVELS_WITH_ATTENTION
    if slot == 0:
        return f"up_blocks.{i}.resnets.{j}{_resnet_inner_from_sgm(rest, path)}"
    if slot == 1 and has_attention:
        return f"up_blocks.{i}.attentions.{j}{rest}"
    _check_range(slot, (2,) if has_attention else (1,), "upsampler slot", path)
    _check_range(j, (UP_RESNETS - 1,), "upsampler position", path)
    return f"up_blocks.{i}.upsamplers.0{_sampler_inner(rest, 'conv', 'conv', path)}"


def normalise_text_encoder_path(path: str) -> str:
    """HF CLIP path with the ``text_model.`` level that transformers >= 5.6 dropped from CLIPTextModel.

    Idempotent; top-level modules of CLIPTextModelWithProjection (``text_projection``) stay as they are.
    """
    if path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
        return "text_model." + path
    return path


def sgm_path_for(part: Part, module_path: str) -> str:
    """The dotted path a stem is made of: SGM layout for the UNet, ``text_model.``-rooted for CLIP."""
    if part == "unet":
        return unet_diffusers_to_sgm(module_path)
    if part in ("te1", "te2"):
        return normalise_text_encoder_path(module_path)
    raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")


def stem_for(part: Part, module_path: str) -> str:
    """Kohya stem of a module named as in our (diffusers / transformers) model."""
    return STEM_PREFIXES[part] + sgm_path_for(part, module_path).replace(".", "_")


def parse_stem_part(stem: str) -> Part:
    """Which model a stem belongs to, by its prefix."""
    for part, prefix in STEM_PREFIXES.items():
        if stem.startswith(prefix):
            return part
    raise ValueError(f"stem {stem!r} has no known prefix; known: {', '.join(STEM_PREFIXES.values())}")


def stem_table(model: nn.Module, part: Part, module_paths: Iterable[str]) -> dict[str, str]:
    """stem -> module path in ``model``: the only sound way back, since underscores are ambiguous."""
    table: dict[str, str] = {}
    for path in module_paths:
        try:
            model.get_submodule(path)
        except AttributeError as error:
            raise ValueError(f"{type(model).__name__} has no module {path!r}") from error
        stem = stem_for(part, path)
        if stem in table and table[stem] != path:
            raise ValueError(f"modules {table[stem]!r} and {path!r} share the stem {stem!r}")
        table[stem] = path
    return table


def unet_diffusers_stem_aliases(module_paths: Iterable[str]) -> dict[str, str]:
    """diffusers-underscore stem (``lora_unet_down_blocks_1_...``, some trainers write these) -> our stem.

    Paths with no SGM name (containers, ``time_proj``) are skipped: no adapter can target them, so
    callers may pass every ``named_modules()`` path.
    """
    aliases = {}
    for path in module_paths:
        try:
            aliases[STEM_PREFIXES["unet"] + path.replace(".", "_")] = stem_for("unet", path)
        except ValueError:
            continue
    return aliases


def attention_module_paths(unet: nn.Module) -> list[str]:
    """Kohya's default UNet targets: every Linear inside each Transformer2DModel (722 on SDXL)."""
    paths = []
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            paths += [f"{name}.{inner}" for inner, child in module.named_modules() if isinstance(child, nn.Linear)]
    return paths


def conv_module_paths(unet: nn.Module) -> list[str]:
    """The extra UNet targets of ``attn+conv``: resnet convs/time projections and the samplers (66 on SDXL).

    conv_in and conv_out are never targeted (docs/adapter-format.md section 3), so only modules inside blocks count.
    """
    paths = []
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            for inner in ("conv1", "conv2", "time_emb_proj", "conv_shortcut"):
                if getattr(module, inner, None) is not None:
                    paths.append(f"{name}.{inner}")
        elif isinstance(module, (Downsample2D, Upsample2D)) and isinstance(module.conv, nn.Conv2d):
            paths.append(f"{name}.conv")
    return paths


def text_encoder_module_paths(text_encoder: nn.Module) -> list[str]:
    """q/k/v/out projections and both MLP layers of every CLIP layer, as named in ``text_encoder``."""
    return [
        name
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.Linear) and _TEXT_ENCODER_TARGET.search(name)
    ]
