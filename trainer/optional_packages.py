"""Packages only some settings need (bitsandbytes, prodigyopt, tensorboard), imported when chosen."""

from __future__ import annotations

import importlib
from types import ModuleType

from trainer.errors import MissingPackageError


def import_optional(module: str, *, feature: str, package: str | None = None) -> ModuleType:
    """``module`` imported, or a MissingPackageError naming ``feature`` and the install command."""
    package = package or module
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(
            f"{feature} needs the {package!r} package, which could not be imported ({exc}); "
            f"install it with: pip install {package}"
        ) from exc
