"""How the project writes files: atomically, so a reader sees the old file or folder or the new one, never half.

Every file goes through ``atomic_path``: write to a temp name in the same folder, fsync, rename over the
target, fsync the folder. Every folder written as a whole (a model, a resume state) goes through
``atomic_folder``: fill a staging folder beside it, then one rename. A failure removes the temp file or
folder and leaves the old one untouched. Also here: what we never open (pickle files) and the user's
cache folder, which several packages share.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

# Pickle-based checkpoint formats: loading them can run arbitrary code, so they are never opened.
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
STAGING_PREFIX = ".tmp-"  # staging folders of atomic_folder; one left behind was a write that crashed


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (new files, a rename) durable; POSIX only (a no-op elsewhere)."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path`` durably, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomically(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    with atomic_path(path) as tmp, tmp.open("xb") as f:
        for chunk in chunks:
            f.write(chunk)


@contextmanager
def atomic_folder(path: str | os.PathLike, if_exists: Literal["replace", "keep", "refuse"]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block ends it becomes ``path`` in one rename.

    What to do when ``path`` already exists then: ``replace`` moves the old folder aside first and deletes it
    after the rename (a crash in between loses neither); ``keep`` discards the new folder (another process
    finished the same one first); ``refuse`` raises ``FileExistsError``. On any error the staging folder is
    removed; one left by a killed process starts with ``STAGING_PREFIX`` (see ``remove_staging_folders``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{STAGING_PREFIX}{path.name}-{secrets.token_hex(6)}")
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(staging)
        aside = None
        if path.exists():
            if if_exists == "keep":
                return
            if if_exists == "refuse":
                raise FileExistsError(f"{path} already exists; choose a new path so nothing is overwritten")
            aside = path.with_name(f"{STAGING_PREFIX}old-{path.name}-{secrets.token_hex(6)}")
            path.rename(aside)
        os.replace(staging, path)
        fsync_dir(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when renamed into place


def remove_staging_folders(parent: Path) -> list[Path]:
    """Staging folders a killed writer left in ``parent``; call only where one process writes."""
    if not parent.is_dir():
        return []
    removed = []
    for path in parent.iterdir():
        if path.name.startswith(STAGING_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def default_cache_dir() -> Path:
    """``$DORA_STUDIO_CACHE``, else the XDG cache folder (``~/.cache/dora-studio``): latents, built-in models."""
    if os.environ.get("DORA_STUDIO_CACHE"):
        return Path(os.environ["DORA_STUDIO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dora-studio"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file, read in 1 MB blocks (adapter files run to gigabytes at VeRA's ranks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
