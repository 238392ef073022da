"""Write a diffusers SDXL pipeline as an original SGM single-file checkpoint.

Front ends (ComfyUI, Forge, A1111) load SDXL as one ``.safetensors`` in the layout Stability's
``generative-models`` repo ships, and so does anything that tests our adapters against them. The key
layout per component:

- UNet: ``model.diffusion_model.`` + SGM module names (``trainer.sdxl.naming``);
- VAE: ``first_stage_model.`` + LDM names, attention q/k/v/proj_out as 1x1 conv weights;
- TE1: ``conditioner.embedders.0.transformer.`` + the HF CLIP key, always under ``text_model.``;
- TE2: ``conditioner.embedders.1.model.`` + OpenCLIP names: fused ``in_proj`` q/k/v, and
  ``text_projection`` stored as OpenCLIP multiplies by it, i.e. the transpose of the HF Linear weight.

Every key of the source state dicts must map; an unknown key raises instead of being dropped.
The tests load the result back with diffusers' own single-file loader and compare bit for bit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor

from trainer.files import atomic_path

from .naming import normalise_text_encoder_path, unet_diffusers_to_sgm

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

StateDict = dict[str, Tensor]


def _split_param(key: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``)."""
    module, _, param = key.rpartition(".")
    return module, param


def unet_to_sgm(state_dict: StateDict) -> StateDict:
    """UNet state dict in SGM names (without the ``model.diffusion_model.`` prefix)."""
    converted = {}
    for key, tensor in state_dict.items():
        module, param = _split_param(key)
        converted[f"{unet_diffusers_to_sgm(module)}.{param}"] = tensor
    return converted


_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_KEY = re.compile(
    r"(?P<side>encoder|decoder)\.(?:"
    r"(?P<top>conv_in|conv_out|conv_norm_out)"
    r"|(?P<blocks>down_blocks|up_blocks)\.(?P<i>\d+)\.(?:resnets\.(?P<j>\d+)\.(?P<res>\w+)"
    r"|(?:downsamplers|upsamplers)\.0\.(?P<sampler>conv))"
    r"|mid_block\.(?:resnets\.(?P<mid_j>\d+)\.(?P<mid_res>\w+)|attentions\.0\.(?P<attn>\w+(?:\.0)?))"
    r")\.(?P<param>weight|bias)$"
)


def vae_to_sgm(state_dict: StateDict) -> StateDict:
    """AutoencoderKL state dict in LDM names (without ``first_stage_model.``).

    LDM numbers decoder levels from the bottom (``up.{n-1-i}``), hence the level count read first.
    Attention projections are Linear in diffusers and 1x1 convs in LDM: they get two unit dims.
    """
    num_levels = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("decoder.up_blocks."))
    converted = {}
    for key, tensor in state_dict.items():
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            converted[key] = tensor
            continue
        match = _VAE_KEY.match(key)
        if match is None:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        side, param = match["side"], match["param"]
        if match["top"]:
            module = _VAE_TOP[match["top"]]
        elif match["blocks"]:
            i = int(match["i"])
            level = f"down.{i}" if match["blocks"] == "down_blocks" else f"up.{num_levels - 1 - i}"
            if match["sampler"]:
                module = f"{level}.{'downsample' if match['blocks'] == 'down_blocks' else 'upsample'}.conv"
            else:
                module = f"{level}.block.{match['j']}.{_rename(_VAE_RESNET, match['res'], key)}"
        elif match["mid_res"]:
            module = f"mid.block_{int(match['mid_j']) + 1}.{_rename(_VAE_RESNET, match['mid_res'], key)}"
        else:
            module = f"mid.attn_1.{_rename(_VAE_ATTENTION, match['attn'], key)}"
            if param == "weight" and match["attn"] != "group_norm":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        converted[f"{side}.{module}.{param}"] = tensor
    return converted


def _rename(table: dict[str, str], name: str, key: str) -> str:
    if name not in table:
        raise ValueError(f"no LDM name for VAE key {key!r}")
    return table[name]


def text_encoder_1_to_sgm(state_dict: StateDict) -> StateDict:
    """CLIP ViT-L keys as SGM stores them (HF names rooted at ``text_model.``, prefix not included)."""
    return {normalise_text_encoder_path(key): tensor for key, tensor in state_dict.items()}


_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(?P<n>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def text_encoder_2_to_sgm(state_dict: StateDict) -> StateDict:
    """CLIPTextModelWithProjection keys in OpenCLIP layout (prefix not included).

    q/k/v are fused into ``in_proj_weight``/``in_proj_bias`` in that order, as nn.MultiheadAttention
    holds them; ``text_projection`` is transposed because OpenCLIP computes ``x @ text_projection``.
    """
    converted: StateDict = {}
    fused: dict[tuple[int, str], dict[str, Tensor]] = {}
    for raw_key, tensor in state_dict.items():
        key = normalise_text_encoder_path(raw_key)
        if key in _OPEN_CLIP_TOP:
            converted[_OPEN_CLIP_TOP[key]] = tensor
            continue
        if key == "text_projection.weight":
            converted["text_projection"] = tensor.T.contiguous()
            continue
        match = _CLIP_LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"no OpenCLIP name for text encoder 2 key {raw_key!r}")
        n, module, param = int(match["n"]), match["module"], match["param"]
        if module.startswith("self_attn.") and module.removeprefix("self_attn.") in _QKV:
            fused.setdefault((n, param), {})[module.removeprefix("self_attn.")] = tensor
        elif module in _OPEN_CLIP_LAYER:
            converted[f"transformer.resblocks.{n}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text encoder 2 key {raw_key!r}")
    for (n, param), parts in fused.items():
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise ValueError(f"text encoder 2 layer {n} lacks {', '.join(missing)} {param}")
        fused_qkv = torch.cat([parts[name] for name in _QKV])
        converted[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = fused_qkv
    return converted


def pipeline_to_sgm_state_dict(pipe: StableDiffusionXLPipeline) -> StateDict:
    """The whole SGM checkpoint of a StableDiffusionXLPipeline (UNet, VAE, both text encoders)."""
    parts = (
        (UNET_PREFIX, unet_to_sgm(pipe.unet.state_dict())),
        (VAE_PREFIX, vae_to_sgm(pipe.vae.state_dict())),
        (TEXT_ENCODER_1_PREFIX, text_encoder_1_to_sgm(pipe.text_encoder.state_dict())),
        (TEXT_ENCODER_2_PREFIX, text_encoder_2_to_sgm(pipe.text_encoder_2.state_dict())),
    )
    return {prefix + key: tensor for prefix, converted in parts for key, tensor in converted.items()}


def save_sgm_checkpoint(
    pipe: StableDiffusionXLPipeline, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write the SGM single file atomically: a reader never sees a half-written checkpoint.

    ``dtype`` casts floating-point tensors only (e.g. torch.float16 as SDXL releases ship).
    """
    path = Path(path)
    tensors = {}
    for key, tensor in pipeline_to_sgm_state_dict(pipe).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return path
