"""What each training step sees: the epoch's batches, each image's crop, flip and caption, and its pixels.

Every random choice of epoch ``e`` comes from a ``random.Random`` seeded by (seed, e, batch, slot), so an
epoch's order and augmentations are a pure function of the seed: a resumed run replays them exactly
without saving any RNG state, and the latent cache can be filled before training knows the order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from trainer.errors import DatasetError, ImageLoadError

from .buckets import (
    BucketSpec,
    CropPlan,
    assign_bucket,
    crop_plan,
    make_buckets,
    micro_conditioning,
)
from .captions import CaptionOptions, process_caption
from .image_io import load_image_rgb, load_mask_image
from .masks import MaskSource, full_mask, to_latent_grid
from .scan import DatasetScan

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class TrainExample:
    """One image of the dataset, the bucket it trains in, and its subset's caption and flip options."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height), upright
    bucket: tuple[int, int]  # (width, height)
    captions: CaptionOptions = CaptionOptions()
    flip: bool = False
    loss_weight: float = 1.0  # dataset.prior_loss_weight for regularization images, as kohya weighs them
    mask: MaskSource | None = None  # where its loss mask comes from (dataset.masked_loss); None: no masked loss


@dataclass(frozen=True)
class AugmentOptions:
    """What applies to every image alike; caption and flip options are each example's (its subset's)."""

    bucket_spec: BucketSpec
    random_crop: bool = False
    background: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class PlannedImage:
    """One image in one step: which, how it is cropped and flipped, and the caption text it gets."""

    example: int  # index into the examples list
    crop: CropPlan
    flipped: bool
    caption: str

    def time_ids(self, example: TrainExample) -> list[int]:
        """SDXL's micro-conditioning; a flipped image's crop starts where the mirrored crop does."""
        width, height = example.size
        top, left = self.crop.crop_top_left
        if self.flipped:
            left = self.crop.resized_size[0] - self.crop.bucket[0] - left
        bucket_width, bucket_height = self.crop.bucket
        return micro_conditioning((height, width), (top, left), (bucket_height, bucket_width))


def plan_examples(
    scan: DatasetScan, spec: BucketSpec, prior_loss_weight: float = 1.0, held_out: bool = False
) -> list[TrainExample]:
    """The scan's training (and regularization) images, or with ``held_out`` its validation images, whose
    captions are fixed (trigger word only: no shuffle, no dropout) and which are never flipped, so their
    loss is measured the same way every time."""
    buckets = make_buckets(spec)
    examples = []
    for item in scan.held_out if held_out else scan.items:
        subset = scan.subsets[item.subset]
        captions = subset.captions
        if held_out:
            captions = CaptionOptions(captions.trigger_word, tag_separator=captions.tag_separator)
        examples.append(
            TrainExample(
                item.path,
                item.caption,
                item.repeats,
                (item.width, item.height),
                assign_bucket(item.width, item.height, buckets, spec),
                captions,
                subset.flip and not held_out,
                prior_loss_weight if item.role == "regularization" else 1.0,
                item.mask,
            )
        )
    return examples


def _rng(seed: int, epoch: int, *position: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/" + "/".join(map(str, position)))


def epoch_batches(examples: list[TrainExample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """kohya's order: each image ``repeats`` times, shuffled within its bucket, cut into batches that never
    mix buckets (the last of a bucket may be short), then the batches shuffled."""
    rng = _rng(seed, epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, example in enumerate(examples):
        by_bucket.setdefault(example.bucket, []).extend([index] * example.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def plan_image(example: TrainExample, index: int, options: AugmentOptions, rng: random.Random) -> PlannedImage:
    """The crop, flip and caption of one image in one step, drawn in a fixed order."""
    width, height = example.size
    crop = crop_plan(width, height, example.bucket, options.random_crop, rng, options.bucket_spec)
    flipped = example.flip and rng.random() < 0.5
    return PlannedImage(index, crop, flipped, process_caption(example.caption, example.captions, rng))


def centred_crop(example: TrainExample, spec: BucketSpec) -> CropPlan:
    """The crop an image gets without random cropping: what the latent cache holds and validation measures."""
    return crop_plan(*example.size, example.bucket, False, None, spec)


def plan_epoch(
    examples: list[TrainExample], options: AugmentOptions, batch_size: int, seed: int, epoch: int
) -> list[list[PlannedImage]]:
    return [
        [
            plan_image(examples[index], index, options, _rng(seed, epoch, batch_number, slot))
            for slot, index in enumerate(batch)
        ]
        for batch_number, batch in enumerate(epoch_batches(examples, batch_size, seed, epoch))
    ]


@dataclass(frozen=True)
class Shard:
    """One process's part of a global batch."""

    images: list[PlannedImage]  # never empty: a process with no image gets a stand-in of weight 0
    weights: list[float]  # 1 per image, 0 for a stand-in
    offset: int  # its first image's place in the global batch (its rows of the step's noise)
    global_count: int  # images in the whole global batch


def shard_batch(batch: list[PlannedImage], rank: int, processes: int) -> Shard:
    """Split a global batch as evenly as possible, in order: process r takes the r-th run of images.

    Every process must run each step (gradients are averaged together), so when a bucket's last batch
    has fewer images than processes, the ones left without repeat an image at weight 0.
    """
    base, extra = divmod(len(batch), processes)
    count = base + (rank < extra)
    offset = rank * base + min(rank, extra)
    if count == 0:
        return Shard([batch[0]], [0.0], 0, len(batch))
    return Shard(batch[offset : offset + count], [1.0] * count, offset, len(batch))


def load_pixels(example: TrainExample, planned: PlannedImage, background: tuple[int, int, int]) -> Tensor:
    """The cropped, maybe flipped image as a [3, H, W] float tensor in [-1, 1], as the VAE expects."""
    try:
        image = load_image_rgb(example.path, background)
    except ImageLoadError as error:
        raise _failed_since_scan(error) from None
    image = _resize_and_crop(image, planned.crop)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return pixels.flip(-1) if planned.flipped else pixels


def load_mask(example: TrainExample, planned: PlannedImage) -> Tensor:
    """The image's loss mask at the latent grid, [1, h, w] in [0, 1]: resized, cropped and flipped exactly as its
    pixels are (``load_pixels``), then averaged over each latent pixel (``masks.to_latent_grid``); all ones when
    it has none."""
    source = example.mask
    if source is None or source.path is None:
        return full_mask(planned.crop.bucket)
    try:
        image = load_mask_image(source.path, source.alpha)
    except ImageLoadError as error:
        raise _failed_since_scan(error) from None
    mask = torch.from_numpy(np.asarray(_resize_and_crop(image, planned.crop), dtype=np.float32).copy()) / 255
    return to_latent_grid(mask.flip(-1) if planned.flipped else mask)


def _failed_since_scan(error: ImageLoadError) -> DatasetError:
    """The scan checks files without decoding them all (a truncated BMP, a PNG with a bad stream but good
    checksums pass), and a file may change after it: end the run with the file and fix, not a traceback."""
    problem = error.problems[0]
    return DatasetError.at(
        problem.where,
        f"{problem.message}; it passed the dataset check when the run started. "
        "Fix or remove it, then continue with --resume auto",
    )


def _resize_and_crop(image: Image.Image, crop: CropPlan) -> Image.Image:
    """The crop plan applied to a PIL image: scaled to ``resized_size``, then cut to the bucket."""
    resized_width, resized_height = crop.resized_size
    if image.size != (resized_width, resized_height):
        image = image.resize((resized_width, resized_height), resample=_resample(image.size, crop.resized_size))
    top, left = crop.crop_top_left
    bucket_width, bucket_height = crop.bucket
    return image.crop((left, top, left + bucket_width, top + bucket_height))


def _resample(size: tuple[int, int], target: tuple[int, int]):
    """Area-averaging when shrinking (no aliasing), Lanczos when enlarging, as kohya does with cv2."""
    from PIL import Image

    return Image.Resampling.BOX if target[0] < size[0] else Image.Resampling.LANCZOS
