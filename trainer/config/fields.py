"""How a setting is declared: a dataclass field whose metadata carries what every reader of the schema needs.

Kept apart from the sections themselves so each group of sections (``config.schema``,
``config.dataset_settings``) declares its fields the same way without importing the other.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple = (),
    minimum: float | None = None,
    maximum: float | None = None,
    advanced: bool = False,
    path: bool = False,
) -> Any:
    """A field with what the CLI, the preset checker and the UI form need to know about it.

    ``path``: a file or folder name; when read from a preset it is taken relative to that preset's folder.
    """
    metadata = dict(help=help, choices=choices, minimum=minimum, maximum=maximum, advanced=advanced, path=path)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)
