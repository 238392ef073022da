"""From a model's output to a caption file: what each mode keeps, and a write that is never half done.

A caption is tags (or a sentence) joined by ", ", as kohya's taggers write them: the trigger word first, then
the tags always added, then the model's. ``missing`` captions only images without a caption, ``overwrite``
replaces every caption, ``append`` keeps an existing caption and adds the tags it lacks. A tag already there
in another spelling (``long_hair`` for ``long hair``, another case) is not added twice. Files are replaced
atomically (``trainer.files``), so a crash leaves the old caption or the new one, never part of either.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.data.scan import read_caption
from trainer.files import write_bytes_atomically

from .tags import split_tags, tag_key

SEPARATOR = ", "


def existing_caption(path: Path) -> str:
    """The caption file's text, whitespace collapsed (any encoding training reads); "" when there is none."""
    return read_caption(path)[0] if path.is_file() else ""


def compose_caption(new_parts: list[str], existing: str, trigger: str, always_tags: tuple[str, ...]) -> str:
    """The trigger word, then ``existing``'s tags (append mode), ``always_tags`` and the model's parts, each
    once: a later spelling of a tag already present is dropped."""
    seen, kept = set(), []
    for part in [trigger, *split_tags(existing), *always_tags, *new_parts]:
        key = tag_key(part)
        if key and key not in seen:
            seen.add(key)
            kept.append(part.strip())
    return SEPARATOR.join(kept)


def write_caption(path: Path, caption: str) -> None:
    """Replace the caption file atomically. A caption file the user made read-only is refused: the atomic
    rename would replace it regardless of its permissions."""
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is read-only")
    write_bytes_atomically(path, [(caption + "\n").encode("utf-8")])
