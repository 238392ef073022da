"""Reading kohya's files: TOML or JSON, options read by type, paths, and the notes an import gives back.

kohya's own readers are lenient in ways users rely on (the kohya_ss GUI writes numbers as strings and
"" for unset), so an option is read by the type we need, accepting those forms, and a value that is none
of them is a ``ConfigError`` naming the file, the option and the fix. Everything an import cannot carry
over, carries with a changed meaning, or takes from kohya's defaults becomes a note; notes with the same
reason are grouped, so a file with many unsupported options still reads as a few lines.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import Any

from trainer.errors import ConfigError

# How each kind of note starts: the CLI prints them one per line, the studio lists them.
DROPPED, CHANGED, DEFAULTED = "not carried over", "changed", "kohya's default"


class Notes:
    """The import's report, grouped by reason: ``drop`` (not carried over), ``change`` (carried with a
    changed meaning) and ``default`` (absent from the files; kohya's default written down)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], list[str]] = {}

    def add(self, kind: str, key: str, reason: str) -> None:
        keys = self._keys.setdefault((kind, reason), [])
        if key not in keys:
            keys.append(key)

    def drop(self, key: str, reason: str) -> None:
        self.add(DROPPED, key, reason)

    def change(self, key: str, reason: str) -> None:
        self.add(CHANGED, key, reason)

    def default(self, key: str, reason: str) -> None:
        self.add(DEFAULTED, key, reason)

    def lines(self) -> list[str]:
        """``kind: key, key: reason``, the not-carried ones first."""
        order = (DROPPED, CHANGED, DEFAULTED)
        grouped = sorted(self._keys.items(), key=lambda item: order.index(item[0][0]))
        return [f"{kind}: {', '.join(keys)}: {reason}" for (kind, reason), keys in grouped]


def read_file(path: Path) -> tuple[dict, bool]:
    """A kohya config as a dict, and whether it was JSON: JSON when it ends in .json or starts with ``{``, else
    TOML (kohya decides by the extension alone; a config saved under another name still reads here)."""
    if not path.is_file():
        raise ConfigError.at(path, "file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError.at(path, "not UTF-8 text; save the config as UTF-8") from None
    as_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    try:
        data = json.loads(text) if as_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        kind = "JSON" if as_json else "TOML"
        raise ConfigError.at(path, f"not valid {kind}: {error}; kohya configs are TOML or JSON") from None
    if not isinstance(data, dict):
        raise ConfigError.at(path, "expected a table of options at the top level")
    return data, as_json


def is_dataset_config(data: dict) -> bool:
    """A dataset config (``--dataset_config``) has ``[general]`` or ``[[datasets]]``; a training config has neither."""
    return "datasets" in data or isinstance(data.get("general"), dict)


def _is_off(value: Any) -> bool:
    return value is None or value == ""


class Options:
    """One table of kohya options (a file's ``[general]``, a ``[[datasets]]`` table, a training config), each
    read by the type we need (``flag``, ``whole``, ``number``, ``numbers``, ``text``, ``texts``, ``size``).
    ``where`` names the table in errors (``dataset.toml: datasets[0]``), ``prefix`` its keys in notes
    (``datasets[0].``), ``folder`` is where its relative paths are taken from."""

    def __init__(self, values: dict, where: str, prefix: str = "", folder: Path = Path()) -> None:
        self.values = values
        self.where = where
        self.prefix = prefix
        self.folder = folder

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def has(self, name: str) -> bool:
        return not _is_off(self.values.get(name))

    def raw(self, name: str) -> Any:
        value = self.values.get(name)
        return None if _is_off(value) else value

    def _bad(self, name: str, expected: str) -> ConfigError:
        return ConfigError.at(
            f"{self.where}: {name}", f"expected {expected}, got {self.values[name]!r}; fix the value in the file"
        )

    def flag(self, name: str) -> bool | None:
        value = self.raw(name)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise self._bad(name, "true or false")

    def whole(self, name: str) -> int | None:
        value = self.raw(name)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self._bad(name, "a whole number") from None
        if value is None or isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise self._bad(name, "a whole number")

    def number(self, name: str) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise self._bad(name, "a number") from None

    def numbers(self, name: str) -> list[float]:
        """One number or a list of them (kohya's per-part rates), as a list."""
        value = self.raw(name)
        values = value if isinstance(value, list) else [] if value is None else [value]
        try:
            return [float(item) for item in values if not isinstance(item, bool)]
        except (TypeError, ValueError):
            raise self._bad(name, "a number or a list of numbers") from None

    def text(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None or isinstance(value, str):
            return value
        raise self._bad(name, "text")

    def texts(self, name: str) -> list[str]:
        """A list of strings; kohya_ss writes some as one space-separated string."""
        value = self.raw(name)
        if value is None:
            return []
        if isinstance(value, str):
            return value.replace('"', "").split()
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise self._bad(name, "a list of text")

    def size(self, name: str) -> tuple[int, int] | None:
        """kohya's resolution: ``512``, ``[512, 768]`` or ``"512,768"``."""
        value = self.raw(name)
        if value is None:
            return None
        parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            sides = [int(part) for part in parts]
        except (TypeError, ValueError):
            raise self._bad(name, "a size like 1024 or [1024, 768]") from None
        if len(sides) not in (1, 2) or min(sides) < 1:
            raise self._bad(name, "a size like 1024 or [1024, 768]")
        return (sides[0], sides[-1])


def resolve_path(value: str, base_dir: Path, key: str, notes: Notes) -> str:
    """An absolute path for a kohya path option. kohya reads relative paths against the folder it was started
    in, which the file does not record, so they are taken against the file's own folder, and said so."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if PureWindowsPath(value).is_absolute():
        notes.change(key, "a Windows path, kept as written: set it to where the folder is on this machine")
        return value
    notes.change(
        key,
        f"relative path, taken against the config's folder {base_dir} (kohya takes it against the "
        "folder it was started in)",
    )
    return str((base_dir / path).resolve())


class Layered:
    """kohya's fallback for a subset's or dataset's option: the first table that sets it, in order (subset,
    its dataset, ``[general]``, then the training config: ``config_util.BlueprintGenerator.search_value``).
    The training config names two options differently (``ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME``)."""

    TRAINING_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

    def __init__(self, *tables: Options | None, training: Options | None = None) -> None:
        self.tables = [t for t in tables if t is not None]
        self.training = training

    def find(self, name: str) -> tuple[Options, str] | None:
        """The table that sets ``name`` and its name there, or None."""
        for table in self.tables:
            if table.has(name):
                return table, name
        training_name = self.TRAINING_NAMES.get(name, name)
        if self.training is not None and self.training.has(training_name):
            return self.training, training_name
        return None

    def get(self, name: str, read: Callable[[Options, str], Any]) -> Any:
        """The value ``read`` (``Options.flag``, ``Options.whole``, ...) gives from the first table that sets it."""
        found = self.find(name)
        return None if found is None else read(*found)
