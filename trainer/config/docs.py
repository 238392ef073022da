"""The settings reference, generated from the schema so it cannot fall behind it."""

from __future__ import annotations

from typing import Any

from .schema import SECTIONS, field_type, fields_of, table_class


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).replace("'", '"')


def _rows_of(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """One row per setting of ``cls``; a list of tables (dataset.subsets) is followed by its own settings."""
    defaults, rows = cls(), []
    for spec in fields_of(cls):
        meta = spec.metadata
        text = meta["help"]
        if meta["choices"]:
            text += f" (one of: {', '.join(meta['choices'])})"
        rows.append((f"{prefix}.{spec.name}", _shown(getattr(defaults, spec.name)), text))
        table = table_class(field_type(cls, spec.name))
        if table is not None:
            rows += _rows_of(table, f"{prefix}.{spec.name}[]")
    return rows


def _rows() -> list[tuple[str, str, str]]:
    return [row for section_name, section in SECTIONS.items() for row in _rows_of(section, section_name)]


def settings_text() -> str:
    width = max(len(key) for key, _, _ in _rows())
    return "\n".join(f"{key:<{width}}  = {default:<24} {text}" for key, default, text in _rows())


def settings_markdown() -> str:
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {text.replace('|', '/')} |" for key, default, text in _rows()]
    return "\n".join(lines)
