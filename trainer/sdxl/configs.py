"""The configs of SDXL base 1.0, so its architecture can be built without its weights.

Copied from stabilityai/stable-diffusion-xl-base-1.0 so the target counts and stems (docs/adapter-format.md,
sections 2 and 3) can be checked on the true architecture: the ``real_*`` builders instantiate it on the
meta device (or on a real one, with random weights, for benchmarks). The built-in tiny and toy models
(``trainer.builtin``) shrink these configs' widths and keep everything that decides a module path.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.errors import ModelLoadError

SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' historical name: these are head counts
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 (size/crop/target) + 1280 (pooled TE2)
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# CLIP ViT-L/14 text tower (``text_encoder``).
SDXL_TEXT_ENCODER_1_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14 text tower (``text_encoder_2``).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_1_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def real_unet(device: str | torch.device = "meta") -> UNet2DConditionModel:
    """The SDXL base UNet with no weights (meta device): for counting and naming its modules."""
    with torch.device(device):
        return UNet2DConditionModel(**copy.deepcopy(SDXL_UNET_CONFIG))


def real_text_encoder_1(device: str | torch.device = "meta") -> CLIPTextModel:
    """SDXL's CLIP ViT-L text encoder with no weights (meta device)."""
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_1_CONFIG))


def real_text_encoder_2(device: str | torch.device = "meta") -> CLIPTextModelWithProjection:
    """SDXL's OpenCLIP bigG text encoder, as transformers models it, with no weights (meta device)."""
    with torch.device(device):
        return CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))


@dataclass(frozen=True)
class Architecture:
    """The configs that decide a model's modules and shapes (what the memory estimate builds, weightless)."""

    unet: dict[str, Any]
    text_encoder_1: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]

    @classmethod
    def from_folder(cls, folder: Path) -> Architecture:
        """The configs of a diffusers model folder (or the config folder of a single-file checkpoint)."""

        def read(part: str, name: str = "config.json") -> dict[str, Any]:
            path = Path(folder) / part / name
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ModelLoadError.at(path, f"cannot read this model config ({error})") from None

        return cls(
            read("unet"),
            read("text_encoder"),
            read("text_encoder_2"),
            read("vae"),
            read("scheduler", "scheduler_config.json"),
        )


SDXL = Architecture(
    SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_1_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, SDXL_SCHEDULER_CONFIG
)
