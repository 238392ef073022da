"""Load and save SDXL models: diffusers folders and SGM single-file checkpoints, safetensors only.

Pickle checkpoints (.ckpt, .pt, .bin) can run arbitrary code when loaded, so they are refused by name
before anything reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.errors import ModelLoadError
from trainer.files import PICKLE_SUFFIXES, atomic_folder

from .sgm_checkpoint import save_sgm_checkpoint


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError.at(
            path,
            "pickle checkpoints are refused because loading them can run arbitrary code. "
            "Convert it to .safetensors (most front ends and model sites offer that) and point at the new file.",
        )


def _check_diffusers_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError.at(
            path,
            "not a diffusers model folder (no model_index.json). Give a diffusers SDXL folder "
            "or an SDXL single-file .safetensors checkpoint.",
        )
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "?")
    except (ValueError, AttributeError) as error:  # bad JSON or bad UTF-8 (both ValueError), or not an object
        raise ModelLoadError.at(
            index, f"not a readable diffusers model_index.json ({error}); download the model folder again"
        ) from None
    families = {"StableDiffusionPipeline": " (Stable Diffusion 1.x or 2.x)"}
    if found != "StableDiffusionXLPipeline":
        raise ModelLoadError.at(
            path,
            f"this is a {found} folder{families.get(found, '')}, not SDXL "
            "(StableDiffusionXLPipeline); DoRA Studio trains SDXL base models",
        )


# Key prefixes that tell checkpoint families apart, first match wins (as ComfyUI's model detection does it).
ARCHITECTURE_MARKERS = (
    ("conditioner.embedders.1.model.", "SDXL"),
    ("conditioner.embedders.0.model.", "the SDXL refiner (it has no CLIP-L text encoder; train on SDXL base)"),
    ("cond_stage_model.model.", "Stable Diffusion 2.x"),
    ("cond_stage_model.transformer.", "Stable Diffusion 1.x"),
    ("double_blocks.", "Flux"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
)


def checkpoint_architecture(keys: Iterable[str]) -> str:
    """What a single-file checkpoint is, from its tensor names alone (nothing is loaded)."""
    keys = list(keys)
    for prefix, name in ARCHITECTURE_MARKERS:
        if any(key.startswith(prefix) for key in keys):
            return name
    return "not a Stable Diffusion checkpoint we recognise"


def _check_single_file(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as error:  # safetensors raises its own SafetensorError for damaged headers
        raise ModelLoadError.at(path, f"not a readable .safetensors file ({error}); download it again") from None
    found = checkpoint_architecture(keys)
    if found != "SDXL":
        raise ModelLoadError.at(
            path,
            f"this checkpoint is {found}, not SDXL; DoRA Studio trains SDXL base models "
            "(SDXL 1.0, Pony, Illustrious, NoobAI and other SDXL fine-tunes)",
        )


def quiet_library_progress() -> None:
    """Per-component load/save bars from diffusers and transformers are noise above our own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_sdxl_pipeline(model: str | Path, config_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionXLPipeline`` from a folder or single file, offline.

    A single file needs the diffusers configs: ``config_dir`` or a diffusers folder named like the file
    beside it (``model.safetensors`` -> ``model/``), since nothing may be downloaded.
    """
    from diffusers import StableDiffusionXLPipeline

    quiet_library_progress()
    path = Path(model)
    _refuse_pickle(path)
    if not path.exists():
        raise ModelLoadError.at(path, "model path does not exist; check the spelling or give an absolute path")
    if path.is_dir():
        _check_diffusers_folder(path)
        return StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError.at(path, "unknown model file type; expected a .safetensors checkpoint or a folder")
    _check_single_file(path)
    config = Path(config_dir) if config_dir else path.with_suffix("")
    if not (config / "model_index.json").is_file():
        raise ModelLoadError.at(
            path,
            f"a single-file checkpoint needs its diffusers config folder to load offline; none at {config}. "
            "Pass the folder of a diffusers SDXL model (only its *.json and tokenizer files are read).",
        )
    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)


def export_pipeline(pipe, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers folder, or an SGM single-file checkpoint when ``out`` ends in .safetensors.

    Written whole beside the target and renamed, so a crash never leaves half a model; an existing ``out``
    is never overwritten.
    """
    out = Path(out)
    if out.suffix.lower() == ".safetensors":
        save_sgm_checkpoint(pipe, out, dtype=dtype)
        return out
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder so nothing is overwritten")
    with atomic_folder(out, if_exists="refuse") as staging:
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(staging, safe_serialization=True)
    return out
