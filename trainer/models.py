"""Load an SDXL base model: a diffusers folder or an SGM single-file checkpoint, safetensors only.

Pickle checkpoints (.ckpt, .pt, .bin) can run arbitrary code when loaded, so they are refused by name
before anything reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapter_file import PICKLE_SUFFIXES


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, with the reason and the fix in the message."""


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: pickle checkpoints are refused because loading them can run arbitrary code. "
            "Convert it to .safetensors (most front ends and model sites offer that) and point at the new file."
        )


def _check_diffusers_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path}: not a diffusers model folder (no model_index.json). Give a diffusers SDXL folder "
            "or an SDXL single-file .safetensors checkpoint."
        )
    found = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "?")
    if found != "StableDiffusionXLPipeline":
        raise ModelLoadError(f"{path}: this is a {found} folder, not SDXL (StableDiffusionXLPipeline)")


def load_sdxl_pipeline(model: str | Path, config_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionXLPipeline`` from a folder or single file, offline.

    A single file needs the diffusers configs: ``config_dir`` or a diffusers folder named like the file
    beside it (``model.safetensors`` -> ``model/``), since nothing may be downloaded.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(model)
    _refuse_pickle(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: model path does not exist; check the spelling or give an absolute path")
    if path.is_dir():
        _check_diffusers_folder(path)
        return StableDiffusionXLPipeline.from_pretrained(
            path, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: unknown model file type; expected a .safetensors checkpoint or a folder")
    config = Path(config_dir) if config_dir else path.with_suffix("")
    if not (config / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs its diffusers config folder to load offline; none at {config}. "
            "Pass the folder of a diffusers SDXL model (only its *.json and tokenizer files are read)."
        )
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config), torch_dtype=dtype, local_files_only=True
    )
