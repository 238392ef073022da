"""DoRA Studio's engine: LoRA and DoRA adapters for SDXL, their kohya file, training runs, and the CLI.

The public Python API is importable from here::

    from trainer import NetworkSpec, adapter_weights, inject_adapters, save_adapter
    from trainer import RunDirectory, Trainer, load_config

Sub-packages, each one concern, importing only the ones listed before it (tests/test_package_layout.py
checks): ``data`` (datasets), ``captioning`` (captions written by a tagger or captioner model), ``config``
(the settings schema and presets; no torch), ``sdxl`` (the model
family and its names), ``adapters`` (the adapter math, put into SDXL models by stem), ``kohya`` (the adapter
file), ``runs`` (the run folder), ``builtin`` (built-in models), ``training`` (a run). ``errors`` (one
error family), ``files`` (atomic writes) and ``optional_packages`` sit under all of them; ``cli`` is on top.
Names are imported on first use, so ``import trainer`` (and ``dora-studio --help``) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AdapterSpec": "trainer.adapters.layers",
    "DoRALayer": "trainer.adapters.layers",
    "LoRALayer": "trainer.adapters.layers",
    "make_adapter": "trainer.adapters.injection",
    "VeRALayer": "trainer.adapters.vera",
    "DVoRALayer": "trainer.adapters.vera",
    "NetworkSpec": "trainer.adapters.injection",
    "adapter_weights": "trainer.adapters.injection",
    "inject_adapters": "trainer.adapters.injection",
    "remove_adapters": "trainer.adapters.injection",
    "select_targets": "trainer.adapters.injection",
    "AdapterWeights": "trainer.adapters.weights",
    "merged_weight": "trainer.adapters.weights",
    "LoadedAdapter": "trainer.kohya.adapter_file",
    "load_adapter": "trainer.kohya.adapter_file",
    "save_adapter": "trainer.kohya.adapter_file",
    "build_metadata": "trainer.kohya.metadata",
    "export_pipeline": "trainer.sdxl.model_files",
    "load_sdxl_pipeline": "trainer.sdxl.model_files",
    "resolve_model_path": "trainer.builtin.resolve",
    "TrainConfig": "trainer.config.schema",
    "from_dict": "trainer.config.parsing",
    "load_config": "trainer.config.presets",
    "RunDirectory": "trainer.runs.run_directory",
    "Trainer": "trainer.training.loop",
    "Problem": "trainer.errors",
    "StudioError": "trainer.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
