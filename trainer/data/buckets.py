"""Aspect-ratio buckets and SDXL's size conditioning.

Bucketing follows kohya sd-scripts (``model_util.make_bucket_resolutions``, ``BucketManager.select_bucket``,
``trim_and_resize_if_required``) so a dataset lands in the same buckets, with the same step count, as
there. The crop offset given to SDXL is the one the SDXL paper and diffusers' training script use: where
the crop starts in the resized image. kohya reports a different value (``get_crop_ltrb``: the margin the
image would have if fitted inside the bucket, sd-scripts issue #1443).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    resolution: int = 1024  # buckets hold at most resolution**2 pixels
    min_side: int = 512
    max_side: int = 2048
    step: int = 64  # every side a multiple of this (the VAE's 8 x the UNet's 8)
    no_upscale: bool = False  # kohya's bucket_no_upscale: never enlarge; min_side/max_side then unused

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"bucket step must be 1 or more, got {self.step}")
        if self.resolution < self.step:
            raise ValueError(f"resolution {self.resolution} is below the bucket step {self.step}: no bucket fits")
        if not 0 < self.min_side <= self.resolution <= self.max_side:
            raise ValueError(
                f"resolution {self.resolution} must lie between the smallest bucket side {self.min_side} "
                f"and the largest {self.max_side}"
            )

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution


@dataclass(frozen=True)
class CropPlan:
    bucket: tuple[int, int]  # (width, height) the image ends up as
    resized_size: tuple[int, int]  # (width, height) after scaling, before the crop
    crop_top_left: tuple[int, int]  # (top, left) = (y, x) of the crop in the resized image


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """All (width, height) on the step grid within the sides and the area, one per aspect ratio, sorted.

    kohya's ``make_bucket_resolutions``: the largest square, then for each width the tallest height that
    keeps the area, and the same pair turned sideways.
    """
    square = int(math.sqrt(spec.max_area) // spec.step) * spec.step
    buckets = {(square, square)}
    for width in range(spec.min_side, spec.max_side + 1, spec.step):
        height = min(spec.max_side, spec.max_area // width // spec.step * spec.step)
        if height >= spec.min_side:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def _round_down(value: float, step: int) -> int:
    """kohya's ``round_to_steps``: round to the nearest pixel, then down to the step."""
    rounded = int(value + 0.5)
    return rounded - rounded % step


def _no_upscale_size(width: int, height: int, spec: BucketSpec) -> tuple[int, int]:
    """kohya's bucket_no_upscale resize: shrink to the area if larger, keeping the aspect ratio best."""
    if width * height <= spec.max_area:
        return width, height
    aspect = width / height
    scaled_width = math.sqrt(spec.max_area * aspect)
    scaled_height = spec.max_area / scaled_width
    by_width = _round_down(scaled_width, spec.step)
    by_height = _round_down(scaled_height, spec.step)
    # "or spec.step": kohya divides by zero here for aspect ratios beyond about 250:1
    error_by_width = abs(by_width / (_round_down(by_width / aspect, spec.step) or spec.step) - aspect)
    error_by_height = abs(_round_down(by_height * aspect, spec.step) / (by_height or spec.step) - aspect)
    if error_by_width < error_by_height:
        return by_width, int(by_width / aspect + 0.5)
    return int(by_height * aspect + 0.5), by_height


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]], spec: BucketSpec) -> tuple[int, int]:
    """The bucket an image of this size trains in, as kohya's ``select_bucket`` picks it.

    Normally: its exact size if that is a bucket, else the bucket nearest in aspect ratio (the first of
    a tie, buckets being sorted). With ``no_upscale`` the image gets its own bucket: its size (shrunk to
    the area if larger) rounded down to the step, never below one step (kohya would make an empty one).
    """
    if spec.no_upscale:
        scaled_width, scaled_height = _no_upscale_size(width, height, spec)
        return (
            max(spec.step, scaled_width - scaled_width % spec.step),
            max(spec.step, scaled_height - scaled_height % spec.step),
        )
    if (width, height) in buckets:
        return width, height
    aspect = width / height
    return min(buckets, key=lambda bucket: abs(bucket[0] / bucket[1] - aspect))


def _cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest scaling that covers the bucket, rounded as kohya rounds it."""
    bucket_width, bucket_height = bucket
    if width / height > bucket_width / bucket_height:  # wider than the bucket: match heights
        resized = (int(width * bucket_height / height + 0.5), bucket_height)
    else:
        resized = (bucket_width, int(height * bucket_width / width + 0.5))
    return max(resized[0], bucket_width), max(resized[1], bucket_height)  # guard float rounding


def crop_plan(
    width: int,
    height: int,
    bucket: tuple[int, int],
    random_crop: bool,
    rng: random.Random,
    spec: BucketSpec | None = None,
) -> CropPlan:
    """Scale the image to cover the bucket, then crop the overflow: centred, or anywhere if random_crop.

    Pass the ``spec`` when it has ``no_upscale``: kohya then leaves an image within the area at its own
    size and only trims it to the step, rather than resampling it (pixel art stays crisp).
    """
    bucket_width, bucket_height = bucket
    resized = _no_upscale_size(width, height, spec) if spec is not None and spec.no_upscale else None
    if resized is None or resized[0] < bucket_width or resized[1] < bucket_height:
        resized = _cover_size(width, height, bucket)
    spare_width, spare_height = resized[0] - bucket_width, resized[1] - bucket_height
    if random_crop:  # kohya's order: the horizontal offset is drawn first
        left, top = rng.randint(0, spare_width), rng.randint(0, spare_height)
    else:
        left, top = spare_width // 2, spare_height // 2
    return CropPlan(bucket, resized, (top, left))


def micro_conditioning(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> list[int]:
    """SDXL's ``add_time_ids``: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Every pair is (height, width) or (top, left), the order of diffusers'
    ``StableDiffusionXLPipeline._get_add_time_ids`` and kohya's ``sdxl_train_util.get_size_embeddings``.
    """
    return [int(value) for value in (*original_size, *crop_top_left, *target_size)]
