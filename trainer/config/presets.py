"""Presets: TOML files of settings, with ``base = "other.toml"`` inheritance and ``--set`` overrides.

A preset names only what differs from the schema defaults (or from its base). Paths in a preset are
relative to the preset's own folder; paths given with ``--set`` are relative to the working directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from trainer.errors import ConfigError, Problem
from trainer.files import write_bytes_atomically

from .parsing import from_dict, resolve_paths, to_dict, unknown_key
from .schema import SECTIONS, TrainConfig, field_type, fields_of

MAX_BASE_DEPTH = 16


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError.at(path, "preset file not found; check the path (presets live in presets/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError.at(path, f"not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError.at(path, "not UTF-8 text; save the preset as UTF-8") from None


def _merge(base: dict, child: dict) -> dict:
    """Child settings win key by key within each section; sections only in one side are kept."""
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in base.items()}
    for name, values in child.items():
        if isinstance(values, dict) and isinstance(merged.get(name), dict):
            merged[name].update(values)
        else:
            merged[name] = values
    return merged


def read_preset(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The preset's settings with its ``base`` chain applied and paths made absolute."""
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p.name) for p in (*_chain, path))
        raise ConfigError.at(path, f"presets inherit from each other in a loop ({cycle}); remove one `base`")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError.at(path, f"more than {MAX_BASE_DEPTH} levels of `base`; flatten the chain")
    data = _read_toml(path)
    base_name = data.pop("base", None)
    data = resolve_paths(data, path.parent)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError.at(path, f'base: expected a file name like "base.toml", got {base_name!r}')
    return _merge(read_preset(path.parent / base_name, (*_chain, path)), data)


def _parse_override_value(annotation: Any, raw: str) -> Any:
    """TOML syntax when it parses (8, 1e-4, true, ["a"]), otherwise the text itself, as a shell user means it."""
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw
    wants_text = annotation is str
    return raw if wants_text and not isinstance(value, str) else value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``section.name=value`` strings on top of preset settings; a bad key or form is named."""
    data = _merge(data, {})
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        section_name, _, name = key.partition(".")
        if not sep:
            problems.append(Problem(f"--set {override}", "write it as section.name=value, e.g. network.rank=16"))
            continue
        section = SECTIONS.get(section_name)
        if section is None or name not in {f.name for f in fields_of(section)}:
            problems.append(unknown_key(key, where=f"--set {key}"))
            continue
        value = _parse_override_value(field_type(section, name), raw.strip())
        data = _merge(data, resolve_paths({section_name: {name: value}}, Path.cwd()))
    if problems:
        raise ConfigError(*problems, context="command line")
    return data


def config_from_text(text: str, base_dir: Path, where: str = "preset") -> TrainConfig:
    """A preset given as text (the UI's upload box, the API): paths and ``base`` relative to ``base_dir``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError.at(where, f"not valid TOML: {error}") from None
    base_name = data.pop("base", None)
    data = resolve_paths(data, base_dir)
    if base_name is not None:
        data = _merge(read_preset(base_dir / str(base_name)), data)
    return from_dict(data, where=where)


def load_config(preset: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The validated config a run uses: schema defaults, then the preset chain, then ``--set``."""
    data = read_preset(preset) if preset is not None else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(data, where=str(preset) if preset else "settings")


def preset_purpose(path: Path, limit: int = 80) -> str:
    """A preset's one-line purpose, for pickers: its first comment's first sentence, cut at ``limit``."""
    try:
        first = next((line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()), "")
    except OSError:
        return ""
    if not first.startswith("#"):
        return ""
    text = first.lstrip("# ").strip()
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def config_toml(config: TrainConfig) -> str:
    return tomli_w.dumps(to_dict(config))


def write_config(config: TrainConfig, path: Path) -> None:
    """The fully resolved settings, so a run can be repeated or resumed from its folder alone."""
    write_bytes_atomically(path, [config_toml(config).encode("utf-8")])
