"""Import kohya's configs: a dataset config (``--dataset_config``), an sd-scripts training config
(``--config_file``) or a kohya_ss GUI config (.json), as our settings and a list of notes.

The settings are nested sections that ``config.parsing.from_dict`` accepts, with absolute paths; the notes
say, one per line, every option that was not carried over and why, every one carried with a changed meaning,
and every kohya default that was written down because ours differs (see each module for the rules:
``dataset`` for kohya's subset > dataset > general > training-config order, ``training`` for the training
options, ``gui`` for how kohya_ss's fields become sd-scripts options). Relative paths in kohya's files are
relative to the folder kohya ran in, which no file records; they are taken against the file's own folder,
and each is noted.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from trainer.config.parsing import from_dict
from trainer.config.presets import load_config
from trainer.config.schema import SECTIONS, TrainConfig, fields_of
from trainer.errors import ConfigError

from .dataset import dataset_settings
from .gui import sd_scripts_options
from .options import Notes, Options, is_dataset_config, read_file, resolve_path
from .training import training_settings


class KohyaImport(NamedTuple):
    settings: dict  # nested sections for from_dict; paths absolute
    notes: list[str]  # "not carried over: key: why", "changed: key: how", "kohya's default: key: what"


def import_kohya(path: str | Path, training: str | Path | None = None) -> KohyaImport:
    """Our settings from ``path`` (a dataset config, or a training config) and an optional training config."""
    path = Path(path).expanduser().resolve()
    data, as_json = read_file(path)
    notes = Notes()
    dataset, dataset_path, options, extra = None, None, None, {}
    if is_dataset_config(data):
        dataset, dataset_path = data, path
        if training is not None:
            options, extra = _training_file(Path(training).expanduser().resolve(), notes)
    elif training is not None:
        raise ConfigError.at(
            path,
            "is a training config, and another is given as the training config; give the "
            "dataset config ([general], [[datasets]]) first",
        )
    else:
        options, extra = _training_options(data, as_json, path, notes)
    if options is not None:
        dataset, dataset_path = _dataset_config(options, dataset, dataset_path, notes)
    settings = training_settings(options, notes) if options is not None else {}
    for part in (extra, dataset_settings(dataset, dataset_path, options, notes)):
        for section, values in part.items():
            settings.setdefault(section, {}).update(values)
    return KohyaImport({name: settings[name] for name in SECTIONS if settings.get(name)}, notes.lines())


def _training_file(path: Path, notes: Notes) -> tuple[Options, dict[str, dict]]:
    data, as_json = read_file(path)
    if is_dataset_config(data):
        raise ConfigError.at(
            path, "is a dataset config ([general], [[datasets]]), not a training config; give it as the first file"
        )
    return _training_options(data, as_json, path, notes)


def _dataset_config(
    options: Options, dataset: dict | None, dataset_path: Path | None, notes: Notes
) -> tuple[dict | None, Path | None]:
    """The dataset config a training config names (``dataset_config``) when none is given; kohya reads
    ``train_data_dir``, ``reg_data_dir`` and ``in_json`` only when there is none."""
    if options.has("dataset_config"):
        named = Path(resolve_path(options.text("dataset_config") or "", options.folder, "dataset_config", notes))
        if dataset is None:
            dataset, _ = read_file(named)
            dataset_path = named
            if not is_dataset_config(dataset):
                raise ConfigError.at(named, "is named by dataset_config but has no [general] or [[datasets]]")
        elif named != dataset_path:
            notes.drop("dataset_config", f"the dataset config given, {dataset_path}, is read instead")
    if dataset is not None:
        for name in ("train_data_dir", "reg_data_dir", "in_json"):
            if options.has(name):
                notes.drop(name, "kohya ignores it when a dataset config is given")
    return dataset, dataset_path


def _training_options(data: dict, as_json: bool, path: Path, notes: Notes) -> tuple[Options, dict[str, dict]]:
    """A training config as one flat table of sd-scripts options (sd-scripts merges a TOML's sections, as
    ``train_util.read_config_from_file`` does), and the settings a kohya_ss GUI config gives directly."""
    extra: dict[str, dict] = {}
    if as_json:  # sd-scripts reads TOML only: a JSON training config is the kohya_ss GUI's
        data, extra = sd_scripts_options(data, notes)
    flat: dict = {}
    for name, value in data.items():
        flat |= value if isinstance(value, dict) else {name: value}
    return Options(flat, str(path), "", path.parent), extra


def is_kohya_config(path: str | Path) -> bool:
    """Whether a file the studio is given is kohya's rather than a preset: JSON always (presets are TOML); TOML
    unless only our section names are at its top and most keys in them are our settings (an sd-scripts config
    may name its sections [training] or [network], but its keys are kohya's)."""
    data, as_json = read_file(Path(path))
    if as_json or is_dataset_config(data) or any(name not in SECTIONS and name != "base" for name in data):
        return True
    keys = [(section, key) for section, values in data.items() if isinstance(values, dict) for key in values]
    ours = sum(key in {spec.name for spec in fields_of(SECTIONS[section])} for section, key in keys)
    return ours * 2 < len(keys)


def load_preset_or_kohya(path: str | Path) -> tuple[TrainConfig, list[str]]:
    """A preset, or a kohya config imported (with its notes): what the studio's upload box loads."""
    if not is_kohya_config(path):
        return load_config(path), []
    imported = import_kohya(path)
    return from_dict(imported.settings, where=f"{Path(path).name} (imported from kohya)"), imported.notes
