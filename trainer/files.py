"""Atomic file writes: a reader (the UI, a front end, a resume) sees the old file or the new one, never half.

Every file the project writes goes through ``atomic_path``: write to a temp name in the same folder,
fsync, rename over the target, fsync the folder. A failure removes the temp file and leaves the old
file untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path`` durably, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes_atomically(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    with atomic_path(path) as tmp, tmp.open("xb") as f:
        for chunk in chunks:
            f.write(chunk)
