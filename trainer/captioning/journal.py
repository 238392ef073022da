"""What an unfinished captioning run already wrote, so running the same command again continues it.

``missing`` mode needs no record (a captioned image is done), but ``overwrite`` and ``append`` cannot tell a
caption they wrote from the one that was there. So each run appends every image it finishes to a hidden file
in the dataset folder (hidden files are never training data, ``data.folders``), headed by the run's settings.
A run with the same settings skips the images listed; other settings start a new record; a run that gets to
the end removes it. Lines are appended, not rewritten: a line cut short by a crash names no image, so at
worst that one image is captioned again.
"""

from __future__ import annotations

import json
from pathlib import Path

JOURNAL_NAME = ".dora-studio-captioning"


class Journal:
    """Read on creation; written from the first image done, so a run that writes nothing leaves no file."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.path = folder / JOURNAL_NAME
        self.header = json.dumps(settings, sort_keys=True)
        lines = self.path.read_text(encoding="utf-8").split("\n") if self.path.is_file() else []
        self.continued = bool(lines) and lines[0] == self.header
        # the last element is "" after a whole line, or the part of a line a crash cut short
        self.done = set(lines[1:-1]) if self.continued else set()

    def __contains__(self, image: Path) -> bool:
        return image.resolve().as_posix() in self.done

    def add(self, image: Path) -> None:
        with self.path.open("a" if self.continued else "w", encoding="utf-8") as handle:
            if not self.continued:
                handle.write(self.header + "\n")
                self.continued = True
            handle.write(image.resolve().as_posix() + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
