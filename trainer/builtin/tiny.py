"""A tiny, random SDXL pipeline built entirely offline, for tests and CPU smoke runs.

It has SDXL's exact module layout (``trainer.sdxl.configs``), so every stem, target count and
checkpoint key matches the real model, while the whole thing builds and saves in a few seconds.
Saved both as a diffusers folder and as an SGM single file, it exercises both loading paths.
"""

from __future__ import annotations

import copy
from pathlib import Path

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
    TINY_TEXT_ENCODER_1_CONFIG,
    TINY_TEXT_ENCODER_2_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from trainer.sdxl.sgm_checkpoint import save_sgm_checkpoint

TINY_CHECKPOINT_NAME = "tiny-sdxl.safetensors"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


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


def random_pipeline(seed: int, unet_config: dict, vae_config: dict, text_encoder_configs: tuple[dict, dict],
                    make_tokenizer, scheduler_config: dict) -> StableDiffusionXLPipeline:
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


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random tiny SDXL pipeline; the same seed gives bit-identical weights."""
    return random_pipeline(seed, TINY_UNET_CONFIG, TINY_VAE_CONFIG,
                           (TINY_TEXT_ENCODER_1_CONFIG, TINY_TEXT_ENCODER_2_CONFIG), _tokenizer, SDXL_SCHEDULER_CONFIG)


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
