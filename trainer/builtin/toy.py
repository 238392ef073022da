"""``builtin:toy-sdxl``: a small SDXL-structured model the project pretrained, so adapters can visibly learn.

The random tiny model (``trainer.builtin.tiny``) proves the plumbing but draws noise. This one has the same
SDXL module layout (722 attention Linears, 10-deep transformers, two CLIP text encoders) at widths chosen
to learn, and was pretrained from scratch by ``dora-studio make-toy-model`` (``trainer.builtin.toy_pretrain``) on
pictures of flat shapes (``trainer.builtin.shapes``) to draw a caption's shape, colour, size, position and
background at 128 px (v2, the packaged weights, follows colours, sizes, backgrounds and mostly shapes, but
barely places: see the README). Its weights ship in the package as fp16 safetensors (``assets/toy-sdxl.safetensors``,
with the recipe that made them in the file's metadata); first use writes a full fp32 model to the cache.

The text encoders are frozen random networks (embeddings scaled so words survive their layers: see
``ToyRecipe.text_embedding_scale``); the tokenizer knows the captions' words as whole tokens
(``toy_tokenizer``), so the UNet learns to read word features. Any other word, such as the trigger
``zqx``, falls back to one token per character, as a rare word does in the real CLIP tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from trainer.errors import ModelLoadError
from trainer.sdxl.configs import SDXL_SCHEDULER_CONFIG, SDXL_VAE_CONFIG, Architecture
from trainer.sdxl.sgm_checkpoint import save_sgm_checkpoint

from .shapes import BACKGROUNDS, COLOURS, COLUMNS, PLAIN_SHAPES, ROWS, SIZES
from .tiny import (
    TINY_TEXT_ENCODER_1_CONFIG,
    TINY_TEXT_ENCODER_2_CONFIG,
    TINY_UNET_CONFIG,
    random_pipeline,
    tiny_vocab,
)

TOY_RESOLUTION = 128
TOY_ASSET = Path(__file__).parent / "assets" / "toy-sdxl.safetensors"
TOY_CHECKPOINT_NAME = "toy-sdxl.safetensors"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# Every word the pretraining captions use; each becomes one token.
CAPTION_WORDS = sorted(
    {
        "a",
        "on",
        "background",
        *SIZES,
        *PLAIN_SHAPES,
        *ROWS,
        *COLUMNS,
        *(word for name in (*COLOURS, *BACKGROUNDS) for word in name.split()),
    }
)


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each of ``words`` one token.

    Each word is tokenized with the merges found so far and its remaining pieces are joined left to
    right by new merges. New merges rank after the old ones, so they never change a word already whole.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE: repeatedly join the adjacent pair with the lowest merge rank."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:index], pieces[index] + pieces[index + 1], *pieces[index + 2 :]]
    return pieces


def toy_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny model's byte vocabulary (specials keep their ids) plus one token per merge."""
    merges = _word_merges(CAPTION_WORDS)
    vocab = tiny_vocab()
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def toy_tokenizer(pad_token: str) -> CLIPTokenizer:
    vocab, merges = toy_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_encoder_config(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "vocab_size": len(toy_vocab_and_merges()[0])}


TOY_TEXT_ENCODER_1_CONFIG = _text_encoder_config(TINY_TEXT_ENCODER_1_CONFIG)
TOY_TEXT_ENCODER_2_CONFIG = _text_encoder_config(TINY_TEXT_ENCODER_2_CONFIG)
# Wider than the tiny model where pictures are made (levels 1 and 2); three distinct widths keep every
# conv_shortcut SDXL has. 16 channels per head, as the tiny model.
TOY_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "block_out_channels": [32, 48, 64],
    "attention_head_dim": [2, 3, 4],
    "sample_size": TOY_RESOLUTION // 8,
}
# v-prediction on SDXL's betas rescaled to zero terminal SNR, sampled with trailing timesteps (see
# trainer.builtin.toy_pretrain for why); a preset training on it sets model.prediction_type and zero_terminal_snr.
TOY_SCHEDULER_CONFIG: dict[str, Any] = {
    **SDXL_SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
TOY_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    "block_out_channels": [16, 32, 64, 64],
    "norm_num_groups": 8,
    "sample_size": TOY_RESOLUTION,
}


ARCHITECTURE = Architecture(  # what builtin:toy-sdxl is built from
    TOY_UNET_CONFIG, TOY_TEXT_ENCODER_1_CONFIG, TOY_TEXT_ENCODER_2_CONFIG, TOY_VAE_CONFIG, TOY_SCHEDULER_CONFIG
)


def build_toy_pipeline(seed: int = 0, vae_scaling_factor: float | None = None) -> StableDiffusionXLPipeline:
    """The toy pipeline with random weights (pretraining starts here; loading fills it)."""
    vae_config = dict(TOY_VAE_CONFIG)
    if vae_scaling_factor is not None:
        vae_config["scaling_factor"] = vae_scaling_factor
    return random_pipeline(
        seed,
        TOY_UNET_CONFIG,
        vae_config,
        (TOY_TEXT_ENCODER_1_CONFIG, TOY_TEXT_ENCODER_2_CONFIG),
        toy_tokenizer,
        TOY_SCHEDULER_CONFIG,
    )


def _check_weights(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError.at(
            path,
            "the toy model's weights are missing; reinstall DoRA Studio, or rebuild "
            "them with `dora-studio make-toy-model` (about 45 minutes on 2 CPU cores)",
        )


def read_toy_metadata(path: Path = TOY_ASSET) -> dict[str, Any]:
    """The recipe, command and library versions stored with the weights."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("dora_studio.toy_recipe", "{}"))


def load_toy_pipeline(path: Path = TOY_ASSET) -> StableDiffusionXLPipeline:
    """The pretrained toy pipeline in fp32, from the packaged fp16 weights."""
    _check_weights(path)
    recipe = read_toy_metadata(path)
    pipe = build_toy_pipeline(vae_scaling_factor=recipe["vae_scaling_factor"])
    weights = load_file(str(path))
    for name in COMPONENTS:
        prefix = name + "."
        part = {key.removeprefix(prefix): value.float() for key, value in weights.items() if key.startswith(prefix)}
        getattr(pipe, name).load_state_dict(part, strict=True)
    return pipe


def save_toy_model(out_dir: Path, weights: Path = TOY_ASSET) -> Path:
    """Write the pretrained toy model as a diffusers folder with its SGM single file inside (fp32)."""
    out_dir = Path(out_dir)
    pipe = load_toy_pipeline(weights)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_sgm_checkpoint(pipe, out_dir / TOY_CHECKPOINT_NAME)
    return out_dir


def builtin_cache_tag(path: Path = TOY_ASSET) -> str:
    """The weights file's digest: a rebuilt toy model gets a fresh cache folder."""
    _check_weights(path)
    return "sha" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def save_builtin(out_dir: Path) -> Path:
    return save_toy_model(out_dir)
