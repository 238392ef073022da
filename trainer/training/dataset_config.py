"""The dataset a config describes, as the data package scans it: its subsets with their settings resolved.

``dataset.path``, ``dataset.regularization_path`` and ``validation.path`` are shorthands for subsets of each
role; ``[[dataset.subsets]]`` tables add more, each unset setting taking the dataset's. check-data, the
memory estimate, the studio and a run all scan through here, so they see the same images.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config.dataset_settings import INHERITED_SUBSET_SETTINGS, SubsetSettings
from trainer.config.schema import TrainConfig
from trainer.data.captions import CaptionOptions
from trainer.data.check import DataReport, report_for_scan
from trainer.data.scan import DatasetScan, scan_subsets
from trainer.data.subsets import SubsetFolder


def _folder(config: TrainConfig, subset: SubsetSettings) -> SubsetFolder:
    """The subset with every unset setting taken from the dataset's. Regularization images are the class
    without the trained concept, so they never take the dataset's trigger word (a subset may set its own)."""
    d = config.dataset
    value = {name: getattr(subset, name) for name in INHERITED_SUBSET_SETTINGS}
    for name, own in value.items():
        if own is None or (own == "" and name == "mask_path"):
            value[name] = getattr(d, name)
    if subset.role == "regularization" and subset.trigger_word is None:
        value["trigger_word"] = ""
    return SubsetFolder(
        path=Path(subset.path),
        role=subset.role,
        repeats=subset.repeats,
        class_tokens=subset.class_tokens,
        caption_extension=value["caption_extension"],
        captions=CaptionOptions(
            value["trigger_word"],
            value["shuffle_tags"],
            value["keep_tokens"],
            value["caption_dropout"],
            value["tag_dropout"],
            d.tag_separator,
        ),
        flip=value["flip"],
        mask_path=Path(value["mask_path"]) if d.masked_loss and value["mask_path"] else None,
    )


def configured_subsets(config: TrainConfig) -> list[SubsetSettings]:
    """The shorthand folders as subsets, then the ``[[dataset.subsets]]`` tables, in that order."""
    shorthands = [
        SubsetSettings(path=path, role=role)
        for path, role in (
            (config.dataset.path, "train"),
            (config.dataset.regularization_path, "regularization"),
            (config.validation.path, "validation"),
        )
        if path
    ]
    return shorthands + list(config.dataset.subsets)


def subset_folders(config: TrainConfig) -> list[SubsetFolder]:
    return [_folder(config, subset) for subset in configured_subsets(config)]


def scan_configured(config: TrainConfig) -> DatasetScan:
    """Every image the config's run would train on, hold out or leave out (raises ``DatasetError`` when
    nothing can train)."""
    return scan_subsets(
        subset_folders(config), config.validation.images, config.validation.seed, config.dataset.masked_loss
    )


def check_configured(config: TrainConfig, scan: DatasetScan | None = None) -> DataReport:
    """check-data's report for the config's dataset, buckets and batch size."""
    scan = scan if scan is not None else scan_configured(config)
    return report_for_scan(scan, config.dataset.bucket_spec(), config.training.batch_size)
