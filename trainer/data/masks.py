"""Masked loss: which part of each image trains, as kohya's ``masked_loss``/``alpha_mask`` and OneTrainer weigh it.

With ``dataset.masked_loss`` every image has a mask: the same-name image in its subset's mask folder (white
trains, black is weighted ``dataset.unmasked_weight``), else, without a mask folder, its own alpha channel. The
mask follows the image's resize, crop and flip (``epoch_plan.load_mask``), is averaged down to the latent grid,
and weighs the loss at each latent pixel (``sdxl.objective.denoising_loss``). An image with nothing to mask
by gets a mask of ones, which gives exactly the loss it would have without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.errors import DatasetError, ImageLoadError, Problem

from .folders import ScanProblem
from .image_io import has_transparency, probe_image
from .subsets import SubsetFolder

LATENT_SCALE = 8  # image pixels per latent pixel along each side: SDXL's VAE halves the size three times


@dataclass(frozen=True)
class MaskSource:
    """Where one image's mask comes from."""

    path: Path | None  # a mask file, or with ``alpha`` the training image itself; None: no mask, all ones
    alpha: bool = False  # the mask is the image's alpha channel, not a mask file's grey levels


FULL_MASK = MaskSource(None)


class MaskFinder:
    """Each image's mask for one scan, and what to report about it.

    A subset with a mask folder finds an image's mask by name, of any image type we read: at the image's place
    in its subset (``10_char/a.png`` -> ``masks/10_char/a.*``), else at the folder's top (``masks/a.*``, kohya's
    flat ``conditioning_data_dir``). Without a mask folder, with masked loss on, the image's alpha channel is
    its mask (kohya's ``alpha_mask``); an image without transparency then trains on its whole area, and is named.

    A missing mask file is a warning, not an error: the image trains on its whole area, exactly as it would
    without masked loss, so nothing wrong is learned; masking only the images that need it is a normal use, and a
    dataset-wide ``mask_path`` is read for regularization images too, which rarely have masks. Each such image is
    named in check-data and the run's log, as an image without a caption is. (kohya refuses a missing
    conditioning image instead.) A mask of another size than its image, or one that cannot be read, is an error:
    it cannot be lined up with the image's pixels, and stretching it would mask the wrong ones.
    """

    def __init__(self, subsets: list[SubsetFolder], masked_loss: bool, image_extensions: set[str]) -> None:
        self.subsets, self.masked_loss = subsets, masked_loss
        self.folders = {
            index: _mask_files(subset.mask_path, image_extensions)
            for index, subset in enumerate(subsets)
            if subset.mask_path is not None
        }
        self.problems: list[ScanProblem] = []  # warnings: images that train on their whole area
        self.errors: list[Problem] = []  # masks that cannot be used

    def source(self, image: Path, subset: int, size: tuple[int, int]) -> MaskSource | None:
        """The mask of ``image`` (of ``size``, upright) in subset ``subset``; None when masked loss is off."""
        folder = self.subsets[subset].mask_path
        if folder is None:
            return self._alpha(image) if self.masked_loss else None
        relative = image.relative_to(self.subsets[subset].path).with_suffix("").as_posix()
        found = self.folders[subset].get(relative) or self.folders[subset].get(image.stem, [])
        if not found:
            self._warn(
                image,
                "missing_mask",
                f"{image}: no mask: trains on the whole image (nothing named {image.stem} with an image extension "
                f"in the mask folder {folder}); add its mask there if it should have one",
            )
            return FULL_MASK
        mask = found[0]
        if len(found) > 1:
            names = ", ".join(path.name for path in found)
            self._warn(mask, "duplicate_mask", f"{names} are all masks of {image}: uses {mask.name}; remove the others")
        try:
            probe = probe_image(mask)
        except ImageLoadError as error:
            self.errors.append(Problem(str(mask), f"the mask of {image}: {error.problems[0].message}"))
            return FULL_MASK
        if (probe.width, probe.height) != size:
            width, height = size
            self.errors.append(
                Problem(
                    str(mask),
                    f"the mask is {probe.width}x{probe.height} but its image {image} is {width}x{height}; a mask must "
                    f"have its image's size: export it again at {width}x{height}",
                )
            )
        return MaskSource(mask)

    def check(self) -> None:
        """Refuse the masks that cannot be used, all at once, before anything trains."""
        if self.errors:
            raise DatasetError(*self.errors)

    def _alpha(self, image: Path) -> MaskSource:
        if has_transparency(image):
            return MaskSource(image, alpha=True)
        self._warn(
            image,
            "no_mask",
            f"{image}: no mask: trains on the whole image (it has no transparency and its subset no mask folder; "
            "save it with an alpha channel, or set dataset.mask_path or the subset's mask_path)",
        )
        return FULL_MASK

    def _warn(self, path: Path, kind: str, message: str) -> None:
        self.problems.append(ScanProblem(path, kind, message))


def _mask_files(folder: Path, image_extensions: set[str]) -> dict[str, list[Path]]:
    """The folder's images, sub-folders included and hidden entries not, by their path in it without extension."""
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix.lower() in image_extensions and not hidden and path.is_file():
            files.setdefault(relative.with_suffix("").as_posix(), []).append(path)
    return files


def full_mask(bucket: tuple[int, int]) -> Tensor:
    """[1, h, w] of ones at the latent grid of a (width, height) bucket: the whole image trains."""
    width, height = bucket
    return torch.ones(1, height // LATENT_SCALE, width // LATENT_SCALE)


def to_latent_grid(mask: Tensor) -> Tensor:
    """[H, W] in [0, 1] -> [1, H/8, W/8], each latent pixel the mean of the pixels it stands for.

    kohya's ``apply_masked_loss`` shrinks the mask to the loss's size with ``interpolate(mode="area")``, and so
    do we: a latent pixel half inside the mask gets half its weight, where nearest or bilinear sampling would
    read one or four pixels and let a thin masked area vanish or move between crops.
    """
    height, width = mask.shape
    size = (height // LATENT_SCALE, width // LATENT_SCALE)
    return F.interpolate(mask[None, None], size=size, mode="area")[0]


def mask_weights(mask: Tensor, unmasked_weight: float) -> Tensor:
    """Each latent pixel's loss weight, unmasked_weight + (1 - unmasked_weight) * mask.

    Computed as 1 - (1 - unmasked_weight) * (1 - mask), the same number, so that a white pixel and
    ``unmasked_weight = 1`` give exactly 1.0 and the loss is bit-identical to one without a mask. OneTrainer
    clamps the mask to [unmasked_weight, 1] instead; the linear form keeps a soft mask's grey levels apart.
    """
    return 1 - (1 - unmasked_weight) * (1 - mask)
