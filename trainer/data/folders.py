"""Walking a subset's folder tree the kohya way: repeats and class tokens from ``N_name`` folder names.

Symlinked folders are followed once (loops and duplicates reported), hidden entries skipped as kohya's glob
skips them, and folders that belong to something else (another subset, a mask folder) left to their own scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .subsets import SubsetFolder

REPEAT_PREFIX = re.compile(r"^([0-9]+)_")


@dataclass
class ScanProblem:
    path: Path
    kind: str  # e.g. "unreadable", "too_large", "missing_caption"
    message: str  # names the file, the reason and the fix
    skipped: bool = False  # True: the file is left out of training; False: a warning only


@dataclass(frozen=True)
class Folder:
    path: Path
    repeats: int
    note: str
    repeat_source: str | None = None  # name of the nearest N_name folder: itself or an ancestor
    class_tokens: str = ""  # that folder's name after the N_ prefix: kohya's caption for uncaptioned images


def _subfolder(path: Path, parent: Folder, fixed_repeats: int | None) -> Folder:
    """kohya reads repeats from the folder name; subfolders (which kohya does not scan) inherit them.

    kohya skips a subset whose repeats are below 1, so ``0_name`` is the way to park images without
    deleting them: we skip those too. A folder with no prefix is skipped by kohya; we train it once per
    epoch instead, since images a user put there are more likely meant to be trained, and say so. A subset
    with its own ``repeats`` gives them to every folder in it (a ``0_`` folder stays parked).
    """
    match = REPEAT_PREFIX.match(path.name)
    tokens = path.name[match.end() :] if match else parent.class_tokens
    if match and int(match.group(1)) == 0:
        return Folder(path, 0, "0 repeats: its images are skipped (as kohya does)", path.name, tokens)
    if fixed_repeats is not None:
        return Folder(path, fixed_repeats, f"{fixed_repeats} repeats, from the subset's repeats", None, tokens)
    if match:
        repeats = int(match.group(1))
        return Folder(path, repeats, f"{repeats} repeats", path.name, tokens)
    if parent.repeat_source is not None:
        source = parent.repeat_source
        note = f"{parent.repeats} repeats, from {source}" if parent.repeats else f"in {source}: images skipped"
        return Folder(path, parent.repeats, note, source, tokens)
    return Folder(path, 1, "no repeat prefix, using 1 (kohya would skip it; name it like 10_name for repeats)")


def _top_folder(subset: SubsetFolder) -> Folder:
    """kohya never reads repeats from the dataset folder's own name, so neither do we."""
    if subset.repeats is not None:
        return Folder(subset.path, subset.repeats, f"{subset.repeats} repeats, from the subset's repeats")
    note = "images directly in the dataset folder: 1 repeat (subfolders like 10_name set repeats)"
    return Folder(subset.path, 1, note)


def walk_subset(
    subset: SubsetFolder,
    problems: list[ScanProblem],
    unused: list[ScanProblem],
    excluded: dict[Path, str],
    image_extensions: set[str],
) -> list[tuple[Folder, list[Path]]]:
    """Every folder of the subset with its files; symlinked folders followed once, loops reported.

    Hidden entries (``.ipynb_checkpoints``, macOS ``._x.jpg``) are skipped, as kohya's glob skips them; a
    hidden image is named in ``unused``, since it looks like a training image. Folders in ``excluded``
    (another subset, a mask folder: path -> what it is) are left to their own scan, and named there too.
    """
    root = subset.path
    pending = [(_top_folder(subset), root.resolve())]
    seen = {root.resolve()}
    found = []
    while pending:
        folder, resolved = pending.pop()
        try:
            # real folders before links to them, so a folder is reported under its own name
            entries = sorted(folder.path.iterdir(), key=lambda p: (p.is_symlink(), p.name))
        except OSError as error:
            message = f"{folder.path}: cannot list it ({error}); check its permissions"
            problems.append(ScanProblem(folder.path, "unreadable_folder", message, skipped=True))
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                if entry.suffix.lower() in image_extensions and not entry.name.startswith("._"):
                    message = f"{entry}: hidden file (its name starts with a dot), skipped as kohya does; rename it"
                    unused.append(ScanProblem(entry, "hidden", message, skipped=True))
            elif entry.is_dir():
                target = entry.resolve()
                if target in excluded:
                    message = f"{entry}: {excluded[target]}, so not scanned as images here"
                    unused.append(ScanProblem(entry, "own_folder", message))
                elif target in seen and resolved.is_relative_to(target):
                    problems.append(
                        ScanProblem(
                            entry,
                            "symlink_loop",
                            f"{entry}: links back to {target}, a folder above it (a symlink loop); not followed",
                        )
                    )
                elif target in seen:
                    problems.append(
                        ScanProblem(
                            entry,
                            "duplicate_folder",
                            f"{entry}: same folder as {target}, which is already scanned; not scanned twice",
                        )
                    )
                else:
                    seen.add(target)
                    pending.append((_subfolder(entry, folder, subset.repeats), target))
            elif entry.is_file():
                files.append(entry)
            elif entry.is_symlink():
                problems.append(ScanProblem(entry, "broken_link", f"{entry}: link to a missing file; fix or remove it"))
        found.append((folder, files))
    return sorted(found, key=lambda pair: pair[0].path)
