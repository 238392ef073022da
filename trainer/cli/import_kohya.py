"""``dora-studio import-kohya``: a kohya dataset or training config as a preset, with what did not carry over.

The preset names only what the kohya files set (the rest is the schema's defaults), with paths relative to
the preset's folder where they lie under it, as presets write them; the notes head the file as comments, so
they stay with the preset. It is checked by loading it, as ``train`` will.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tomli_w

from trainer.config.kohya_import import import_kohya
from trainer.config.parsing import from_dict
from trainer.config.presets import load_config
from trainer.config.schema import SECTIONS, field_type, fields_of, table_class
from trainer.errors import UsageError
from trainer.files import write_bytes_atomically

from .common import EXIT_OK


def cmd_import_kohya(args: argparse.Namespace) -> int:
    imported = import_kohya(args.file, args.training)
    from_dict(imported.settings, where=f"{args.file} (imported)")  # every problem named before anything is written
    sources = " ".join(str(Path(f).name) for f in (args.file, args.training) if f)
    header = "".join(f"# {line}\n" for line in [f"imported from kohya: {sources}", *imported.notes])
    if not args.out:  # the notes are the preset's first lines
        print(header + tomli_w.dumps(imported.settings), end="")
        return EXIT_OK
    out = Path(args.out).expanduser().resolve()
    if out.exists():
        raise UsageError.at(args.out, "already exists; choose a new preset path so nothing is overwritten")
    settings = {name: _relative(values, SECTIONS[name], out.parent) for name, values in imported.settings.items()}
    write_bytes_atomically(out, [(header + tomli_w.dumps(settings)).encode("utf-8")])
    load_config(out)
    print("\n".join([*imported.notes, f"preset written to {out}"]))
    return EXIT_OK


def _relative(values: dict, cls: type, folder: Path) -> dict:
    """A copy of one table with its path settings (and its nested tables') relative to ``folder`` where they
    lie under it: the inverse of ``parsing.resolve_paths`` for a preset written there."""
    relative = dict(values)
    for spec in fields_of(cls):
        value = relative.get(spec.name)
        table = table_class(field_type(cls, spec.name))
        if table is not None and isinstance(value, list):
            relative[spec.name] = [_relative(item, table, folder) for item in value]
        elif spec.metadata["path"] and isinstance(value, str) and Path(value).is_relative_to(folder):
            relative[spec.name] = Path(value).relative_to(folder).as_posix()
    return relative


def add_import_kohya_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-kohya", help="a kohya dataset config, sd-scripts config or kohya_ss .json as a preset, with notes"
    )
    p.add_argument(
        "file", help="kohya dataset config (.toml/.json), or a training config (sd-scripts .toml, kohya_ss .json)"
    )
    p.add_argument("--training", help="the training config to go with a dataset config")
    p.add_argument("--out", help="write the preset here (default: print it)")
    p.set_defaults(func=cmd_import_kohya)
