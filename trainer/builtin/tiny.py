"""A tiny, random SDXL pipeline built entirely offline, for tests and CPU smoke runs.

Its configs keep every structural choice of SDXL's (``trainer.sdxl.configs``) that decides a module path
(block types, depths, resnets per block, 12 and 32 text-encoder layers, shortcut convs, up/down samplers)
and shrink only the widths, so every stem, target count and checkpoint key matches the real model, while
the whole thing builds and saves in a few seconds.
Saved both as a diffusers folder and as an SGM single file, it exercises both loading paths.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from trainer.sdxl.configs import (
    SDXL_SCHEDULER_CONFIG,
    SDXL_TEXT_ENCODER_1_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    Architecture,
)
from trainer.sdxl.sgm_checkpoint import save_sgm_checkpoint

TINY_CHECKPOINT_NAME = "tiny-sdxl.safetensors"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# The tokenizer (``tiny_vocab``): 256 byte symbols, their "</w>" forms, then the two specials.
TINY_VOCAB_SIZE = 514
TINY_BOS_TOKEN_ID = 512
TINY_EOS_TOKEN_ID = 513
TINY_EXCLAMATION_TOKEN_ID = 0  # "!", the pad token of tokenizer_2 as in SDXL

# Hidden sizes must differ between the two encoders: diffusers' single-file loader tells TE1 from TE2
# by comparing the stored position-embedding width with the model's
# (create_diffusers_clip_model_from_ldm); with equal widths TE2 would be filled from TE1's keys.
TINY_TEXT_ENCODER_1_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_1_CONFIG,
    "hidden_size": 16,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "projection_dim": 16,
    "vocab_size": TINY_VOCAB_SIZE,
    "bos_token_id": TINY_BOS_TOKEN_ID,
    "eos_token_id": TINY_EOS_TOKEN_ID,
    "pad_token_id": TINY_EOS_TOKEN_ID,
}

# projection_dim != hidden_size on purpose: a transposed text_projection then changes its shape,
# so the single-file round trip catches an orientation mistake that a square matrix would hide.
TINY_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_2_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "projection_dim": 24,
    "vocab_size": TINY_VOCAB_SIZE,
    "bos_token_id": TINY_BOS_TOKEN_ID,
    "eos_token_id": TINY_EOS_TOKEN_ID,
    "pad_token_id": TINY_EXCLAMATION_TOKEN_ID,
}

# Three distinct widths so every resnet that has a conv_shortcut in SDXL has one here too;
# head counts [1, 2, 4] give 16 channels per head at every level, as SDXL has 64 at every level.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "block_out_channels": [16, 32, 64],
    "attention_head_dim": [1, 2, 4],
    "norm_num_groups": 8,
    "addition_time_embed_dim": 8,
    "cross_attention_dim": (TINY_TEXT_ENCODER_1_CONFIG["hidden_size"] + TINY_TEXT_ENCODER_2_CONFIG["hidden_size"]),
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT_ENCODER_2_CONFIG["projection_dim"],
    "sample_size": 8,  # 64 px at the VAE's factor 8
}

# Four levels as in SDXL, so latents are 1/8 of the image size everywhere in the project.
TINY_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    "block_out_channels": [8, 16, 32, 32],
    "norm_num_groups": 8,
    "sample_size": 64,
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + extra)
            extra += 1
    return [chr(code) for code in symbols]


def tiny_vocab() -> dict[str, int]:
    """CLIP's base vocabulary without merges: every byte alone and word-final, then the specials.

    With no merges each character is a token, so any caption tokenizes, as with the real tokenizer.
    """
    symbols = _bytes_to_unicode()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], pad_token=pad_token, model_max_length=77)


def random_pipeline(
    seed: int,
    unet_config: dict,
    vae_config: dict,
    text_encoder_configs: tuple[dict, dict],
    make_tokenizer,
    scheduler_config: dict,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline of freshly initialised networks; the same seed gives bit-identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**copy.deepcopy(unet_config))
        vae = AutoencoderKL(**copy.deepcopy(vae_config))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_configs[0]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_configs[1]))
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=make_tokenizer(pad_token=EOS_TOKEN),
        tokenizer_2=make_tokenizer(pad_token="!"),  # SDXL's tokenizer_2 pads with "!"
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
    )


ARCHITECTURE = Architecture(  # what builtin:tiny-sdxl is built from
    TINY_UNET_CONFIG, TINY_TEXT_ENCODER_1_CONFIG, TINY_TEXT_ENCODER_2_CONFIG, TINY_VAE_CONFIG, SDXL_SCHEDULER_CONFIG
)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random tiny SDXL pipeline; the same seed gives bit-identical weights."""
    return random_pipeline(
        seed,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
        (TINY_TEXT_ENCODER_1_CONFIG, TINY_TEXT_ENCODER_2_CONFIG),
        _tokenizer,
        SDXL_SCHEDULER_CONFIG,
    )


def save_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder with its SGM single file inside; returns the folder.

    One folder holds both so that ``from_single_file(file, config=folder)`` has its configs at hand.
    """
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_sgm_checkpoint(pipe, out_dir / TINY_CHECKPOINT_NAME)
    return out_dir


def builtin_cache_tag() -> str:
    """``builtin:tiny-sdxl`` is seed 0, rebuilt bit-identically from code."""
    return "seed0"


def save_builtin(out_dir: Path) -> Path:
    return save_tiny_model(out_dir, seed=0)
