"""Settings from plain data (a preset's TOML, the studio's form, ``--set``): every value checked against its field.

Checking is generic: a field's type, choices and bounds come from the schema (``config.schema``), so each
setting is validated the same way wherever it comes from, and every problem is reported at once, each
naming its key. Paths are made absolute against the folder they were written relative to.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from trainer.errors import ConfigError, Problem

from .schema import SECTIONS, TrainConfig, all_keys, field_type, fields_of, table_class


def _type_name(annotation: Any) -> str:
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false"}
    if get_origin(annotation) is list:
        return f"a list of {_type_name(get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}"
    if _is_optional(annotation):
        return _type_name(_non_none(annotation))
    return names.get(annotation, str(annotation))


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in get_args(annotation)


def _non_none(annotation: Any) -> Any:
    return next(arg for arg in get_args(annotation) if arg is not type(None))


def _coerce(annotation: Any, value: Any) -> Any:
    """The value as the field's type, or raise ValueError; ints are accepted where floats are expected."""
    if _is_optional(annotation):
        return None if value is None else _coerce(_non_none(annotation), value)
    if get_origin(annotation) is list:
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(get_args(annotation)[0], item) for item in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ValueError
    return value


def _check_value(key: str, spec: dataclasses.Field, annotation: Any, value: Any) -> tuple[Any, Problem | None]:
    """(coerced value, None) or (None, the problem with it)."""
    try:
        value = _coerce(annotation, value)
    except ValueError:
        return None, Problem(key, f"expected {_type_name(annotation)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # TOML allows nan and inf; no bound rejects nan
        return None, Problem(key, f"expected a finite number, got {value}")
    meta = spec.metadata
    if meta["choices"] and value not in meta["choices"]:
        return None, Problem(key, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta["minimum"] is not None and value < meta["minimum"]:
            return None, Problem(key, f"{value} is below the minimum {meta['minimum']}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            return None, Problem(key, f"{value} is above the maximum {meta['maximum']}")
    return value, None


def unknown_key(key: str, where: str | None = None) -> Problem:
    """``key`` is no setting: suggest the closest one. ``where``: how the user wrote it (default: the key)."""
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f"did you mean {close[0]}?" if close else "`dora-studio settings` lists them all"
    return Problem(where or key, f"unknown setting; {hint}")


def _build(cls: type, values: dict, prefix: str, problems: list[Problem]) -> Any:
    """An instance of the settings class ``cls`` from ``values``; problems are named ``prefix.name``."""
    specs = {f.name: f for f in fields_of(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in specs:
            problems.append(unknown_key(key) if cls in SECTIONS.values() else _unknown_table_key(cls, key, name))
            continue
        annotation = field_type(cls, name)
        table = table_class(annotation)
        if table is not None:
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                problems.append(Problem(key, f"expected a list of tables ([[{key}]] in TOML), got {value!r}"))
                continue
            kwargs[name] = [_build(table, item, f"{key}[{i}]", problems) for i, item in enumerate(value)]
            continue
        value, problem = _check_value(key, specs[name], annotation, value)
        if problem:
            problems.append(problem)
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _unknown_table_key(cls: type, key: str, name: str) -> Problem:
    names = [f.name for f in fields_of(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}?" if close else f"its settings are {', '.join(names)}"
    return Problem(key, f"unknown setting; {hint}")


def from_dict(data: dict, where: str = "settings") -> TrainConfig:
    """Build and validate a config from nested sections; every problem is reported at once."""
    problems: list[Problem] = []
    sections: dict[str, Any] = {}
    for section_name, values in data.items():
        if section_name not in SECTIONS:
            problems.append(
                unknown_key(section_name)
                if not isinstance(values, dict)
                else Problem(f"[{section_name}]", f"unknown section; sections are {', '.join(SECTIONS)}")
            )
            continue
        if not isinstance(values, dict):
            problems.append(Problem(section_name, f"expected a [{section_name}] table"))
            continue
        sections[section_name] = _build(SECTIONS[section_name], values, section_name, problems)
    config = TrainConfig(**sections)
    problems += [] if problems else config.problems()
    if problems:
        raise ConfigError(*problems, context=where)
    return config


def _resolve_path(value: Any, base_dir: Path) -> Any:
    if not isinstance(value, str) or not value or value.startswith("builtin:"):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _resolve_table(cls: type, values: dict, base_dir: Path) -> dict:
    """A copy of one table's settings with its path settings, and those of its nested tables, made absolute."""
    resolved = dict(values)
    for spec in fields_of(cls):
        value = resolved.get(spec.name)
        table = table_class(field_type(cls, spec.name))
        if table is not None and isinstance(value, list):
            resolved[spec.name] = [_resolve_table(table, v, base_dir) if isinstance(v, dict) else v for v in value]
        elif spec.metadata["path"] and spec.name in resolved:
            resolved[spec.name] = _resolve_path(value, base_dir)
    return resolved


def resolve_paths(data: dict, base_dir: Path) -> dict:
    """A copy of nested settings with relative path settings made absolute against ``base_dir``.

    Presets name paths relative to their own folder, so a preset works from any working directory and
    the run's ``config.toml`` (always absolute) means the same thing from anywhere.
    """
    resolved = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    for section_name, section in SECTIONS.items():
        values = resolved.get(section_name)
        if isinstance(values, dict):
            resolved[section_name] = _resolve_table(section, values, base_dir)
    return resolved


def _without_none(value: Any) -> Any:
    """TOML has no null: unset settings are left out, in nested tables too."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def to_dict(config: TrainConfig) -> dict:
    """Nested sections with every setting, None left out (TOML has no null)."""
    return {name: _without_none(dataclasses.asdict(getattr(config, name))) for name in SECTIONS}
