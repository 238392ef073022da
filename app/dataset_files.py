"""The Dataset tab's changes to a dataset folder: a caption saved, an image parked and brought back.

Nothing here deletes or overwrites a user's file. A caption is replaced atomically (the old one stays until
the new one is whole on disk); excluding an image moves it and its caption into a ``0_excluded/`` folder
beside it, which kohya's convention (0 repeats) and our scan leave out of training, and restoring moves them
back; a file already at the destination is a refusal naming it. Masks stay in their mask folder: a parked
image looks for none, and the restored image finds its mask again. File names come from the browser, so each
is resolved and must lie inside one of the dataset folders being shown (``chosen_image``).
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.captioning.writer import write_caption
from trainer.data.scan import IMAGE_EXTENSIONS, read_caption
from trainer.data.subsets import SubsetFolder
from trainer.errors import DatasetError

from .dataset_rows import caption_file, subset_of

EXCLUDED_FOLDER = "0_excluded"


def dataset_file(subsets: list[SubsetFolder], root: Path, name: str) -> tuple[Path, SubsetFolder]:
    """The file the browser names (relative to ``root``) and its subset, if it lies inside a dataset folder
    once resolved; ``DatasetError`` otherwise (``../``, an absolute path, a link leading out)."""
    if not name.strip():
        raise DatasetError.at("image", "select an image in the gallery or the table first")
    path = root / name.strip()
    subset = subset_of(subsets, path)
    if subset is None or not path.resolve().is_relative_to(subset.path.resolve()):
        raise DatasetError.at(name, "not inside the dataset folder shown; select an image in the gallery")
    return path, subset


def chosen_image(subsets: list[SubsetFolder], root: Path, name: str) -> tuple[Path, SubsetFolder]:
    """``dataset_file``, which must be an image that is there."""
    path, subset = dataset_file(subsets, root, name)
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        raise DatasetError.at(name, "no such image (moved or deleted?); open the folder again")
    return path, subset


def caption_text(image: Path, subset: SubsetFolder) -> tuple[str, str]:
    """The caption file's text for editing, and a note: not UTF-8, no caption file yet, cannot read it."""
    path = caption_file(image, subset)
    if not path.is_file():
        return "", f"No caption file yet: saving writes {path.name}."
    try:
        text, warning = read_caption(path)
    except OSError as error:
        return "", f"Cannot read {path.name} ({error}); check its permissions."
    return text, warning.removeprefix(f"{path}: ") if warning else ""


def save_caption(image: Path, subset: SubsetFolder, text: str) -> str:
    """Replace the image's caption with ``text`` (as UTF-8); the old caption stays whole if the write fails."""
    path = caption_file(image, subset)
    try:
        write_caption(path, " ".join(text.split()))
    except OSError as error:
        raise DatasetError.at(
            path,
            f"cannot write the caption ({error}); the old caption is unchanged. Make the file and its folder "
            "writable and check the disk has room, then save again",
        ) from None
    return f"Saved {path.name}."


def _move_with_caption(image: Path, subset: SubsetFolder, folder: Path) -> Path:
    """Move the image into ``folder`` with its caption (unless another image shares that caption), both or
    neither; nothing is overwritten: a file already there is a refusal naming it."""
    caption = caption_file(image, subset)
    shared = any(
        p.stem == image.stem and p != image and p.suffix.lower() in IMAGE_EXTENSIONS for p in image.parent.iterdir()
    )
    moves = [(image, folder / image.name)]
    if caption.is_file() and not shared:
        moves.append((caption, folder / caption.name))
    for _, target in moves:
        if target.exists():
            raise DatasetError.at(target, "already exists, so nothing was moved; rename or remove one of the two")
    folder.mkdir(exist_ok=True)
    done: list[tuple[Path, Path]] = []
    try:
        for source, target in moves:
            os.rename(source, target)
            done.append((source, target))
    except OSError as error:
        for source, target in reversed(done):
            os.rename(target, source)
        raise DatasetError.at(image, f"cannot move it ({error}); check the folder's permissions") from None
    return folder / image.name


def exclude(image: Path, subset: SubsetFolder) -> Path:
    """Park the image (and its caption) in ``0_excluded/`` beside it; its new path."""
    if image.parent.name == EXCLUDED_FOLDER:
        raise DatasetError.at(image, f"already in {EXCLUDED_FOLDER}/; Restore brings it back")
    return _move_with_caption(image, subset, image.parent / EXCLUDED_FOLDER)


def restore(image: Path, subset: SubsetFolder) -> Path:
    """Move a parked image (and its caption) out of ``0_excluded/`` to where it was; its new path. The
    folder is removed once empty."""
    if image.parent.name != EXCLUDED_FOLDER or image.parent == subset.path:
        raise DatasetError.at(image, f"not in a {EXCLUDED_FOLDER}/ folder: only excluded images can be restored")
    restored = _move_with_caption(image, subset, image.parent.parent)
    if not any(image.parent.iterdir()):
        image.parent.rmdir()
    return restored
