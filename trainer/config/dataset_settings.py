"""The dataset's settings: the folders, how their images and captions train, regularization and validation.

A dataset is one folder (``dataset.path``, with kohya's ``N_name`` sub-folders for repeats) or several
subsets (``[[dataset.subsets]]``, kohya's ``[[datasets.subsets]]``), each with its own repeats and caption
handling; a subset setting left unset takes the dataset's.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.buckets import BucketSpec

from .fields import setting

SUBSET_ROLES = ("train", "regularization", "validation")


@dataclass
class SubsetSettings:
    """One folder of images with its own repeats and caption handling; unset (None) means the dataset's."""

    path: str = setting("", "folder of images with same-name captions (its N_name sub-folders set repeats)", path=True)
    role: str = setting(
        "train",
        "train; regularization (class images, balanced to the training images and weighted by "
        "dataset.prior_loss_weight, as kohya's is_reg); validation (held out, only measured)",
        choices=SUBSET_ROLES,
    )
    repeats: int | None = setting(
        None, "repeats of every image in it (0: left out); unset: from N_name folder names, else 1", minimum=0
    )
    class_tokens: str = setting("", "caption of images without a caption file (kohya's class_tokens)")
    caption_extension: str | None = setting(None, "caption file extension")
    trigger_word: str | None = setting(None, "word put first in every caption")
    keep_tokens: int | None = setting(None, "leading tags never shuffled or dropped", minimum=0)
    shuffle_tags: bool | None = setting(None, "shuffle comma-separated tags each step")
    caption_dropout: float | None = setting(
        None, "chance a step trains with an empty caption", minimum=0.0, maximum=1.0
    )
    tag_dropout: float | None = setting(None, "chance each tag is dropped in a step", minimum=0.0, maximum=1.0)
    flip: bool | None = setting(None, "randomly mirror images left-right")
    mask_path: str = setting(
        "", "folder of masks named like the images (with dataset.masked_loss; default: dataset.mask_path)", path=True
    )


# The subset settings that default to the dataset setting of the same name.
INHERITED_SUBSET_SETTINGS = (
    "caption_extension",
    "trigger_word",
    "keep_tokens",
    "shuffle_tags",
    "caption_dropout",
    "tag_dropout",
    "flip",
    "mask_path",
)


@dataclass
class DatasetSettings:
    path: str = setting(
        "",
        "dataset folder: images with same-name captions, or subfolders like 10_name (or use dataset.subsets)",
        path=True,
    )
    subsets: list[SubsetSettings] = setting(
        [],
        "several folders, each a [[dataset.subsets]] table with its own path, role, repeats and caption settings "
        "(kohya's [[datasets.subsets]]; a subset setting left unset takes the dataset's); "
        "with or instead of dataset.path",
        advanced=True,
    )
    regularization_path: str = setting(
        "",
        "folder of regularization (class) images, like kohya's reg_data_dir: balanced to the training images, "
        "loss weighted by prior_loss_weight",
        path=True,
        advanced=True,
    )
    prior_loss_weight: float = setting(
        1.0, "loss weight of regularization images (kohya's prior_loss_weight)", minimum=0.0, advanced=True
    )
    caption_extension: str = setting(".txt", "caption file extension", advanced=True)
    resolution: int = setting(
        1024, "training resolution: buckets hold at most resolution x resolution pixels", minimum=64, maximum=4096
    )
    min_bucket_side: int = setting(512, "smallest bucket side", minimum=64, advanced=True)
    max_bucket_side: int = setting(2048, "largest bucket side", minimum=64, advanced=True)
    bucket_step: int = setting(64, "bucket sides are multiples of this", minimum=8, advanced=True)
    bucket_no_upscale: bool = setting(
        False, "never enlarge small images; each gets a bucket of its own size", advanced=True
    )
    trigger_word: str = setting("", "word put first in every caption (the name your adapter answers to)")
    shuffle_tags: bool = setting(False, "shuffle comma-separated tags each step (after keep_tokens)")
    keep_tokens: int = setting(0, "leading tags never shuffled or dropped (the trigger word counts)", minimum=0)
    caption_dropout: float = setting(0.0, "chance a step trains with an empty caption", minimum=0.0, maximum=1.0)
    tag_dropout: float = setting(0.0, "chance each tag is dropped in a step", minimum=0.0, maximum=1.0)
    tag_separator: str = setting(",", "what separates tags in captions", advanced=True)
    flip: bool = setting(False, "randomly mirror images left-right (not for asymmetric characters or text)")
    random_crop: bool = setting(
        False, "crop at random places instead of the centre (disables the latent cache)", advanced=True
    )
    background_colour: str = setting("#ffffff", "colour transparent images are put on", advanced=True)
    masked_loss: bool = setting(
        False,
        "weight the loss per pixel by a mask: a mask file from mask_path, else the image's alpha channel",
        advanced=True,
    )
    mask_path: str = setting(
        "", "folder of masks named like the images (white: train, black: unmasked_weight)", path=True, advanced=True
    )
    unmasked_weight: float = setting(
        0.0,
        "loss weight where the mask is black (0: ignored; 1: as if no mask)",
        minimum=0.0,
        maximum=1.0,
        advanced=True,
    )
    cache_latents: bool = setting(True, "encode images with the VAE once and keep the latents on disk")
    latent_cache_dir: str = setting(
        "", "where latents are kept (default: the user cache folder)", path=True, advanced=True
    )
    cache_text_encoder_outputs: bool = setting(
        True, "encode captions once when the text encoders are frozen and captions do not vary", advanced=True
    )
    loader_workers: int = setting(
        2,
        "processes reading images ahead of the GPU (0: read in the main process)",
        minimum=0,
        maximum=64,
        advanced=True,
    )

    def bucket_spec(self) -> BucketSpec:
        return BucketSpec(
            self.resolution, self.min_bucket_side, self.max_bucket_side, self.bucket_step, self.bucket_no_upscale
        )


@dataclass
class ValidationSettings:
    path: str = setting(
        "", "folder of held-out images (with captions) whose loss is measured, never trained on", path=True
    )
    images: int = setting(
        0, "or: hold this many training images out, chosen by validation.seed (regularization images never)", minimum=0
    )
    every_n_steps: int = setting(0, "measure every N optimizer steps (0: after every epoch)", minimum=0)
    seed: int = setting(0, "seed of the held-out choice and of the fixed noise the loss is measured at", minimum=0)
