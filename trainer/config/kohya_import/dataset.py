"""A kohya dataset config (``--dataset_config``) as our ``[dataset]`` and ``[validation]`` tables.

kohya's rules, from ``library/config_util.py``: an option is read from the subset, else its dataset, else
``[general]``, else the training config, else kohya's default; a subset with ``metadata_file`` is a
fine-tuning subset and one with ``conditioning_data_dir`` a ControlNet (or, with ``masked_loss``, a mask)
subset. Our subsets inherit from one dataset the same way, so each option kohya lets a subset set becomes the
dataset's setting (the first subset's value) plus an override on every subset whose value differs.

One dataset of ours has one resolution, batch size and bucket layout. kohya's later ``[[datasets]]`` whose
values equal the first's are merged into it (kohya would train the same images at the same sizes); one that
differs is not carried over, and the note says why: a dataset at another resolution trains other pixels.
Without a dataset config, the training config's ``train_data_dir`` and ``reg_data_dir`` are our
``dataset.path`` and ``dataset.regularization_path``, which read kohya's ``N_name`` folders the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.dataset_settings import DatasetSettings
from trainer.errors import ConfigError

from .options import Layered, Notes, Options, resolve_path

# kohya's dataset-config schema (config_util.ConfigSanitizer): what each table may hold.
SUBSET_OPTIONS = {
    "color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard", "token_warmup_min",
    "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes", "resize_interpolation",
    "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_extension",
    "class_tokens", "cache_info",
}  # fmt: skip
SUBSET_ONLY_OPTIONS = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"}
DATASET_OPTIONS = {
    "batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso", "min_bucket_reso",
    "validation_seed", "validation_split", "resolution", "network_multiplier", "skip_image_resolution",
}  # fmt: skip

# Subset options we have no setting for, and the value that asks for nothing (kohya's default).
UNSUPPORTED_SUBSET_OPTIONS: dict[str, tuple[str, Any]] = {
    "color_aug": ("colour augmentation is not implemented here", False),
    "face_crop_aug_range": ("face-centred crop augmentation is not implemented here", None),
    "caption_suffix": ("nothing appends text to captions here; add it to the caption files", None),
    "keep_tokens_separator": ("captions are not split at a separator here; use keep_tokens (a count of tags)", None),
    "secondary_separator": ("tags are split at one separator here (dataset.tag_separator)", None),
    "enable_wildcard": ("wildcards and multi-line captions are not expanded here", False),
    "token_warmup_min": ("tag warm-up is not implemented here", 1),
    "token_warmup_step": ("tag warm-up is not implemented here", 0),
    "caption_dropout_every_n_epochs": ("only per-step caption dropout (caption_dropout_rate) is implemented here", 0),
    "custom_attributes": ("custom attributes (such as diff_output_preservation) are not implemented here", None),
    "resize_interpolation": ("images are resized with one fixed filter here", None),
    "cache_info": ("kohya's cache of image sizes; not needed here", False),
    "network_multiplier": ("one adapter strength for every dataset here", 1.0),
    "skip_image_resolution": ("small images are not skipped here; dataset.bucket_no_upscale keeps them small", None),
}
# kohya option -> (our subset setting, how it is read); unset on a subset means the dataset's.
INHERITED = {
    "caption_extension": ("caption_extension", Options.text),
    "keep_tokens": ("keep_tokens", Options.whole),
    "shuffle_caption": ("shuffle_tags", Options.flag),
    "caption_dropout_rate": ("caption_dropout", Options.number),
    "caption_tag_dropout_rate": ("tag_dropout", Options.number),
    "flip_aug": ("flip", Options.flag),
    "caption_prefix": ("trigger_word", Options.text),
}
# kohya subset options that are dataset settings here: on for all when any subset turns them on.
DATASET_WIDE = {"random_crop": "random_crop", "alpha_mask": "masked_loss", "caption_separator": "tag_separator"}
# kohya dataset option -> (our setting, how it is read, which section)
DATASET_LEVEL = {
    "batch_size": ("batch_size", Options.whole, "training"),
    "min_bucket_reso": ("min_bucket_side", Options.whole, "dataset"),
    "max_bucket_reso": ("max_bucket_side", Options.whole, "dataset"),
    "bucket_reso_steps": ("bucket_step", Options.whole, "dataset"),
    "bucket_no_upscale": ("bucket_no_upscale", Options.flag, "dataset"),
}
# The training config's options this module reads (the rest are the training module's).
TRAINING_OPTIONS = (
    set(INHERITED) | set(DATASET_WIDE) | set(DATASET_LEVEL) | set(UNSUPPORTED_SUBSET_OPTIONS) | DATASET_OPTIONS
) | {
    "train_batch_size", "dataset_repeats", "train_data_dir", "reg_data_dir", "conditioning_data_dir", "masked_loss",
    "prior_loss_weight", "validate_every_n_steps",
}  # fmt: skip
CONDITIONING_UNUSED = "kohya reads it for ControlNet training, or as masks with masked_loss, which is not set"
KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default, in the dataset config and on its command line alike
KOHYA_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl"}  # train_util, any case
DEFAULTS = DatasetSettings()


@dataclass
class _Subset:
    layers: Layered  # where its options are read, in kohya's order
    table: dict  # our [[dataset.subsets]] table, inherited settings not yet in it
    images: int | None  # image files directly in its folder (kohya's count); None: folder not found


def dataset_settings(config: dict | None, path: Path | None, training: Options | None, notes: Notes) -> dict[str, dict]:
    """Our ``dataset``, ``validation`` and ``training.batch_size`` settings from a dataset config (``path``)
    and the training config's dataset options; without a dataset config, from ``train_data_dir``."""
    if config is None or path is None:
        return _from_folders(training, notes) if training is not None else {}
    general = Options(_table(config.get("general", {}), f"{path}: general"), f"{path}: general", "general.")
    _check_keys(general, SUBSET_OPTIONS | DATASET_OPTIONS, notes)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError.at(path, "no [[datasets]] table; add one with a [[datasets.subsets]] and its image_dir")
    carried: list[tuple[Layered, list[_Subset]]] = []
    for index, values in enumerate(datasets):
        where = f"{path}: datasets[{index}]"
        dataset = Options(_table(values, where), where, f"datasets[{index}].")
        _check_keys(dataset, SUBSET_OPTIONS | DATASET_OPTIONS | {"subsets"}, notes)
        layers = Layered(dataset, general, training=training)
        subsets = [_subset(dataset, i, layers, path, notes) for i in range(len(_subsets(dataset)))]
        if any(subsets):
            carried.append((layers, [s for s in subsets if s]))
    if not carried:
        raise ConfigError.at(
            path,
            "no subset can be trained here (fine-tuning subsets with metadata_file are not "
            "read); give DreamBooth-style subsets: image_dir with caption files",
        )
    layers, subsets = carried[0]
    first = _dataset_values(layers)
    for other_layers, other_subsets in carried[1:]:
        differing = [name for name, value in _dataset_values(other_layers).items() if value != first[name]]
        if differing:
            notes.drop(
                other_layers.tables[0].prefix.rstrip("."),
                f"differs from the first dataset in {', '.join(differing)}; a dataset here has one resolution, "
                "batch size and bucket layout: import it from a config of its own",
            )
        else:
            subsets += other_subsets
    sections = _dataset_level(layers, training, notes)
    overrides = _inherited([subset.layers for subset in subsets], sections["dataset"], notes)
    sections["dataset"]["subsets"] = [subset.table | override for subset, override in zip(subsets, overrides)]
    counts = [subset.images for subset in subsets if subset.table.get("role") != "regularization"]
    _validation_split(layers, counts, sections, notes)
    return sections


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError.at(where, f"expected a table of options, got {value!r}")
    return value


def _subsets(dataset: Options) -> list:
    subsets = dataset.values.get("subsets")
    if not isinstance(subsets, list) or not subsets:
        raise ConfigError.at(dataset.where, "has no [[datasets.subsets]]; add one with image_dir = its images' folder")
    return subsets


def _check_keys(table: Options, allowed: set[str], notes: Notes) -> None:
    """Options kohya's schema does not allow here, and unsupported options that ask for something."""
    for name, value in table.values.items():
        if name == "prior_loss_weight":
            notes.drop(
                table.key(name),
                "kohya reads it only from the training config (its dataset-config schema "
                "rejects it): set it there, or set dataset.prior_loss_weight",
            )
        elif name not in allowed:
            notes.drop(
                table.key(name),
                "not an option of kohya's dataset config at this level (kohya would "
                "reject the file); check its spelling",
            )
        elif name in UNSUPPORTED_SUBSET_OPTIONS and value not in (None, "", UNSUPPORTED_SUBSET_OPTIONS[name][1]):
            notes.drop(table.key(name), UNSUPPORTED_SUBSET_OPTIONS[name][0])


def _subset(dataset: Options, index: int, dataset_layers: Layered, path: Path, notes: Notes) -> _Subset | None:
    """Subset ``index`` of ``dataset`` as our table, or None (noted) when it cannot train here."""
    where = f"{dataset.where}.subsets[{index}]"
    subset = Options(_table(_subsets(dataset)[index], where), where, f"{dataset.prefix}subsets[{index}].")
    _check_keys(subset, SUBSET_OPTIONS | SUBSET_ONLY_OPTIONS, notes)
    if subset.has("metadata_file"):
        notes.drop(
            subset.prefix.rstrip("."),
            "a fine-tuning subset (captions in metadata_file) is not read here: "
            "write its captions as .txt files beside the images",
        )
        return None
    image_dir = subset.text("image_dir")
    if image_dir is None:
        raise ConfigError.at(where, "image_dir missing; set it to the folder of the subset's images")
    folder = resolve_path(image_dir, path.parent, subset.key("image_dir"), notes)
    training = dataset_layers.training
    layers = Layered(subset, *dataset_layers.tables, training=training)
    repeats = layers.get("num_repeats", Options.whole)
    table: dict[str, Any] = {"path": folder, "repeats": 1 if repeats is None else repeats}
    if subset.flag("is_reg"):
        table["role"] = "regularization"
    class_tokens = layers.get("class_tokens", Options.text)
    if class_tokens:
        table["class_tokens"] = class_tokens
    if subset.has("conditioning_data_dir"):
        if training is not None and training.flag("masked_loss"):
            masks = subset.text("conditioning_data_dir") or ""
            table["mask_path"] = resolve_path(masks, path.parent, subset.key("conditioning_data_dir"), notes)
        else:
            notes.drop(subset.key("conditioning_data_dir"), CONDITIONING_UNUSED)
    return _Subset(layers, table, _image_count(Path(folder), subset.key("image_dir"), notes))


def _image_count(folder: Path, key: str, notes: Notes) -> int | None:
    """Images directly in ``folder``, as kohya counts them; a sub-folder is noted (our scan reads it too)."""
    if not folder.is_dir():
        return None
    entries = list(folder.iterdir())
    if any(entry.is_dir() for entry in entries):
        notes.change(
            key,
            "its sub-folders' images train here too (kohya reads only the images directly in it); "
            "move them out to leave them out",
        )
    return sum(entry.suffix.lower() in KOHYA_IMAGE_EXTENSIONS for entry in entries if entry.is_file())


def _dataset_values(layers: Layered) -> dict[str, Any]:
    """What one dataset of ours holds once: resolution, batch size, buckets, validation split."""
    values = {
        "resolution": layers.get("resolution", Options.size),
        "enable_bucket": layers.get("enable_bucket", Options.flag),
    }
    for name, (_, read, _) in DATASET_LEVEL.items():
        values[name] = layers.get(name, read)
    return values | {name: layers.get(name, Options.number) for name in ("validation_split", "validation_seed")}


def _dataset_level(layers: Layered, training: Options | None, notes: Notes) -> dict[str, dict]:
    """The dataset's own options (its resolution, batch size, buckets) and the training config's dataset-wide ones."""
    sections: dict[str, dict] = {"dataset": {}, "training": {}, "validation": {}}
    dataset = sections["dataset"]
    resolution = layers.get("resolution", Options.size)
    if resolution is not None:
        side = round(math.sqrt(resolution[0] * resolution[1]))
        dataset["resolution"] = side
        if resolution[0] != resolution[1]:
            notes.change(
                "resolution",
                f"{resolution[0]}x{resolution[1]} becomes dataset.resolution = {side}: "
                "buckets here hold at most side x side pixels, the same area",
            )
    bucketed = layers.get("enable_bucket", Options.flag)
    if not bucketed:
        notes.change(
            "enable_bucket",
            "off (kohya's default): kohya crops every image to the resolution; here images "
            "always train in aspect-ratio buckets",
        )
    for name, (ours, read, section) in DATASET_LEVEL.items():
        value = layers.get(name, read)
        if value is not None and (bucketed or name == "batch_size"):  # kohya ignores bucket options without buckets
            sections[section][ours] = value
    side = dataset.get("resolution")
    if side is not None:  # our buckets must hold the resolution itself
        if side < DEFAULTS.min_bucket_side and "min_bucket_side" not in dataset:
            dataset["min_bucket_side"] = side
        if side > DEFAULTS.max_bucket_side and "max_bucket_side" not in dataset:
            dataset["max_bucket_side"] = side
    if training is not None:
        for kohya, ours, read in (
            ("prior_loss_weight", "prior_loss_weight", Options.number),
            ("masked_loss", "masked_loss", Options.flag),
        ):
            if training.has(kohya):
                dataset[ours] = read(training, kohya)
        if training.has("validate_every_n_steps"):
            sections["validation"]["every_n_steps"] = training.whole("validate_every_n_steps")
    return sections


def _inherited(subsets: list[Layered], dataset: dict, notes: Notes) -> list[dict]:
    """Each option kohya lets a subset set: the first subset's value as the dataset's setting, and per subset
    the overrides where its value differs. Options that are dataset-wide here are on when any subset has them."""
    overrides: list[dict] = [{} for _ in subsets]
    for kohya, (ours, read) in INHERITED.items():
        values = [layers.get(kohya, read) for layers in subsets]
        if kohya == "caption_extension" and None in values:
            notes.default(
                kohya,
                f"not set: kohya reads {KOHYA_CAPTION_EXTENSION} caption files; if yours are .txt, "
                "set dataset.caption_extension",
            )
            values = [KOHYA_CAPTION_EXTENSION if value is None else value for value in values]
        if kohya == "caption_prefix" and any(values):
            separators = [layers.get("keep_tokens_separator", Options.text) for layers in subsets]
            values = [_trigger_word(value, separator) for value, separator in zip(values, separators)]
            notes.change(kohya, "becomes trigger_word: put first as a tag (kohya prepends the text as it is)")
        default = getattr(DEFAULTS, ours)  # kohya's default too, but for caption_extension (set above)
        values = [default if value is None else value for value in values]
        if values[0] != default or kohya == "caption_extension":
            dataset[ours] = values[0]
        for override, value in zip(overrides, values):
            if value != dataset.get(ours, default):
                override[ours] = value
    for kohya, ours in DATASET_WIDE.items():
        default = getattr(DEFAULTS, ours)
        read = Options.text if isinstance(default, str) else Options.flag
        values = [layers.get(kohya, read) for layers in subsets]
        values = [default if value is None else value for value in values]
        chosen = values[0] if isinstance(default, str) else any(values)
        if chosen != default:
            dataset[ours] = chosen
        if len(set(values)) > 1:
            notes.change(kohya, f"differs between subsets; dataset.{ours} = {chosen!r} holds for all of them here")
    return overrides


def _trigger_word(prefix: str | None, keep_separator: str | None) -> str | None:
    """A caption prefix as a trigger word: its text before kohya's keep-tokens separator, if it has one."""
    if not prefix:
        return None
    text = prefix.split(keep_separator)[0] if keep_separator else prefix
    return text.strip(" ,") or None


def _validation_split(layers: Layered, counts: list[int | None], sections: dict[str, dict], notes: Notes) -> None:
    """kohya's fraction as our count: each training subset (``counts``: its images) holds out round(images x
    fraction), as kohya's ``train_util.split_train_val`` does per subset; regularization images never are."""
    seed = layers.get("validation_seed", Options.whole)
    if seed is not None:
        sections["validation"]["seed"] = seed
    fraction = layers.get("validation_split", Options.number)
    if not fraction:
        return
    if None in counts or not counts:
        notes.drop(
            "validation_split",
            f"{fraction} of the images, which could not be counted (a folder was not "
            "found): set validation.images to the number to hold out",
        )
        return
    held_out = sum(round(count * fraction) for count in counts if count is not None)
    sections["validation"]["images"] = held_out
    notes.change(
        "validation_split",
        f"{fraction} becomes validation.images = {held_out} of the "
        f"{sum(c for c in counts if c is not None)} training images; which ones is chosen "
        "by validation.seed, not as kohya chooses",
    )


def _from_folders(training: Options, notes: Notes) -> dict[str, dict]:
    """kohya without a dataset config: ``N_name`` folders under ``train_data_dir`` (and ``reg_data_dir``), which
    ``dataset.path`` and ``dataset.regularization_path`` read the same way; each folder is a kohya subset."""
    layers = Layered(training=training)
    sections = _dataset_level(layers, training, notes)
    _inherited([layers], sections["dataset"], notes)
    folders = {"train_data_dir": "path", "reg_data_dir": "regularization_path"}
    if training.flag("masked_loss"):
        folders["conditioning_data_dir"] = "mask_path"
    elif training.has("conditioning_data_dir"):
        notes.drop("conditioning_data_dir", CONDITIONING_UNUSED)
    for kohya, ours in folders.items():
        if training.has(kohya):
            sections["dataset"][ours] = resolve_path(training.text(kohya) or "", training.folder, kohya, notes)
    counts: list[int | None] = []
    if training.has("train_data_dir"):
        root = Path(sections["dataset"]["path"])
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and _repeats(p)) if root.is_dir() else None
        counts = (
            [None] if subfolders is None else [_image_count(p, f"train_data_dir {p.name}", notes) for p in subfolders]
        )
    _validation_split(layers, counts, sections, notes)
    return sections


def _repeats(folder: Path) -> int:
    """kohya's repeats of an ``N_name`` folder (0: skipped, as kohya skips folders without a number)."""
    number = folder.name.partition("_")[0]
    return int(number) if number.isdigit() else 0
