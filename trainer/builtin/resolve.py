"""``builtin:NAME`` model paths: each built-in model is built once into the user's cache folder and reused.

The cache folder's name carries a tag that changes whenever the weights would (the tiny model's seed, the
toy model's file digest), so a rebuilt model never reuses a stale folder.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from trainer.errors import ModelLoadError
from trainer.files import atomic_folder, default_cache_dir
from trainer.sdxl.configs import Architecture
from trainer.sdxl.model_files import quiet_library_progress

from . import tiny, toy

BUILTIN_PREFIX = "builtin:"
# name -> the module that writes it (``save_builtin(folder)``), tags its cache folder (``builtin_cache_tag()``)
# and holds its configs (``ARCHITECTURE``)
BUILTIN_MODELS = {"tiny-sdxl": tiny, "toy-sdxl": toy}


def _builtin(model: str) -> tuple[str, ModuleType]:
    """The name of a ``builtin:`` model and the module that makes it; refused by name when unknown."""
    name = model.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ModelLoadError.at(
            model,
            "unknown built-in model; built-ins are " + ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS),
        )
    return name, BUILTIN_MODELS[name]


def resolve_builtin(model: str, cache_dir: Path | None = None) -> Path:
    """The folder of a ``builtin:`` model, built on first use into the cache and reused after.

    Built whole and renamed into place, so two runs starting together never see a half-written model
    (the second to finish keeps the first one's folder: they are identical).
    """
    name, builder = _builtin(model)
    quiet_library_progress()
    folder = (cache_dir or default_cache_dir()) / "models" / f"{name}-{builder.builtin_cache_tag()}"
    if not (folder / "model_index.json").is_file():
        with atomic_folder(folder, if_exists="keep") as staging:
            builder.save_builtin(staging)
    return folder


def builtin_architecture(model: str) -> Architecture:
    """The configs of a ``builtin:`` model, without building it."""
    return _builtin(model)[1].ARCHITECTURE


def resolve_model_path(model: str) -> Path:
    """A model setting as a path: ``builtin:`` names resolved (and built if needed), anything else as given."""
    return resolve_builtin(model) if model.startswith(BUILTIN_PREFIX) else Path(model)
