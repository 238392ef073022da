"""The settings reference, generated from the schema so it cannot fall behind it."""

from __future__ import annotations

from typing import Any

from .schema import SECTIONS, TrainConfig, fields_of


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).replace("'", '"')


def _rows() -> list[tuple[str, str, str]]:
    defaults = TrainConfig()
    rows = []
    for section_name, section in SECTIONS.items():
        for spec in fields_of(section):
            meta = spec.metadata
            text = meta["help"]
            if meta["choices"]:
                text += f" (one of: {', '.join(meta['choices'])})"
            rows.append(
                (f"{section_name}.{spec.name}", _shown(getattr(getattr(defaults, section_name), spec.name)), text)
            )
    return rows


def settings_text() -> str:
    width = max(len(key) for key, _, _ in _rows())
    return "\n".join(f"{key:<{width}}  = {default:<24} {text}" for key, default, text in _rows())


def settings_markdown() -> str:
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {text.replace('|', '/')} |" for key, default, text in _rows()]
    return "\n".join(lines)
