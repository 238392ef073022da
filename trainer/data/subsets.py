"""A dataset as several folders (subsets), and the two kohya rules that act across them.

Regularization images are repeated to balance the training images exactly as kohya sd-scripts does
(``DreamBoothDataset.__init__``), and a validation split takes images out of training by seed. Both are
pure functions of counts, so check-data, the memory estimate and the run agree on every number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .captions import CaptionOptions

ROLES = ("train", "regularization", "validation")


@dataclass(frozen=True)
class SubsetFolder:
    """One folder and how its images train; the data package's view of a ``[[dataset.subsets]]`` table."""

    path: Path
    role: str = "train"  # one of ROLES
    repeats: int | None = None  # None: from N_name folder names, else 1
    class_tokens: str = ""  # the caption of an image without a caption file ("" : the folder's name tokens)
    caption_extension: str = ".txt"
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip: bool = False
    mask_path: Path | None = None  # a folder of same-name masks (kept out of the image scan)

    def __post_init__(self) -> None:
        # as kohya does: "txt" means ".txt"; once here, so every reader of the subset agrees
        if not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)


def balance_regularization(train_total: int, reg_repeats: list[int]) -> list[int]:
    """Each regularization image's repeats after kohya's balancing; 0: the image is not used.

    kohya registers regularization images in order, each with its repeats, until they reach the training
    images' count (repeats included); the ones after that are left out. If all of them fall short, it adds
    one repeat to each in turn until the counts are equal. Written here in closed form.
    """
    if train_total <= 0 or not reg_repeats:
        return [0] * len(reg_repeats)
    if sum(reg_repeats) >= train_total:
        balanced, reached = [], 0
        for repeats in reg_repeats:
            balanced.append(repeats if reached < train_total else 0)
            reached += balanced[-1]
        return balanced
    rounds, extra = divmod(train_total - sum(reg_repeats), len(reg_repeats))
    return [repeats + rounds + (index < extra) for index, repeats in enumerate(reg_repeats)]


def held_out_indices(paths: list[Path], count: int, seed: int) -> set[int]:
    """Which of ``paths`` a validation split of ``count`` images takes: a seeded choice over the sorted
    paths, so it depends only on the files and the seed, not on the order the folders were listed in."""
    order = sorted(range(len(paths)), key=lambda i: paths[i].as_posix())
    return set(random.Random(f"validation/{seed}").sample(order, min(count, len(order))))
