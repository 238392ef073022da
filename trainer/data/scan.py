"""Find the training images under a folder, kohya-style, and say plainly what was skipped and why.

Folders named ``N_name`` give their images N repeats (kohya sd-scripts' DreamBooth layout); captions are
same-name text files beside the images. Every image is checked here without a full decode (header and
chunk checksums; JPEG data at 1/8 scale), so a broken file is reported before training rather than
crashing it hours in.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import DatasetError, ImageLoadError

from .image_io import probe_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}  # kohya's IMAGE_EXTENSIONS, any letter case
FORMATS_FOR_EXTENSION = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},  # MPO: camera JPEGs carrying a second picture
    ".png": {"PNG"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP", "DIB"},
}
# Below 64 px a side is under 8 latent pixels: training would upscale almost no information 8x or more,
# and with bucket_no_upscale the bucket (the size rounded down to 64) would be empty; kohya crashes there.
MIN_IMAGE_SIDE = 64
REPEAT_PREFIX = re.compile(r"^([0-9]+)_")
DATASET_FIX = "put images with same-name .txt captions in it, or in subfolders named like 10_mychar for 10 repeats"


@dataclass
class ImageItem:
    path: Path
    caption: str  # whitespace collapsed; "" when missing or empty (the trigger word is added later)
    repeats: int
    folder: Path
    width: int  # upright, after EXIF orientation
    height: int


@dataclass
class FolderReport:
    path: Path
    repeats: int
    image_count: int  # image files found, including ones skipped for being broken
    note: str


@dataclass
class ScanProblem:
    path: Path
    kind: str  # e.g. "unreadable", "too_large", "missing_caption"
    message: str  # names the file, the reason and the fix
    skipped: bool = False  # True: the file is left out of training; False: a warning only


@dataclass
class DatasetScan:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    folders: list[FolderReport] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)
    ignored_files: dict[str, int] = field(default_factory=dict)  # non-image files by extension

    @property
    def total_repeated_images(self) -> int:
        """Images one epoch shows, as kohya counts them: each image once per repeat."""
        return sum(item.repeats for item in self.items)

    def _folder_name(self, item: ImageItem) -> str:
        return item.folder.relative_to(self.root).as_posix() if item.folder != self.root else self.root.name

    def folder_counts(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: per folder (relative to the root), its repeats and usable images."""
        counts: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = counts.setdefault(self._folder_name(item), {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return counts

    def tag_frequency(self, separator: str) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how often each tag appears in its captions."""
        tags: dict[str, Counter] = {}
        for item in self.items:
            tags.setdefault(self._folder_name(item), Counter()).update(
                tag.strip() for tag in item.caption.split(separator) if tag.strip()
            )
        return {folder: dict(counter) for folder, counter in tags.items()}


@dataclass(frozen=True)
class _Folder:
    path: Path
    repeats: int
    note: str
    repeat_source: str | None = None  # name of the nearest N_name folder: itself or an ancestor


def _subfolder(path: Path, parent: _Folder) -> _Folder:
    """kohya reads repeats from the folder name; subfolders (which kohya does not scan) inherit them.

    kohya skips a subset whose repeats are below 1, so ``0_name`` is the way to park images without
    deleting them: we skip those too. A folder with no prefix is skipped by kohya; we train it once per
    epoch instead, since images a user put there are more likely meant to be trained, and say so.
    """
    match = REPEAT_PREFIX.match(path.name)
    if match:
        repeats = int(match.group(1))
        note = f"{repeats} repeats" if repeats else "0 repeats: its images are skipped (as kohya does)"
        return _Folder(path, repeats, note, path.name)
    if parent.repeat_source is not None:
        source = parent.repeat_source
        note = f"{parent.repeats} repeats, from {source}" if parent.repeats else f"in {source}: images skipped"
        return _Folder(path, parent.repeats, note, source)
    return _Folder(path, 1, "no repeat prefix, using 1 (kohya would skip it; name it like 10_name for repeats)")


def _walk(root: Path, problems: list[ScanProblem]) -> list[tuple[_Folder, list[Path]]]:
    """Every folder under ``root`` with its files; symlinked folders followed once, loops reported.

    Hidden entries (``.ipynb_checkpoints``, macOS ``._x.jpg``) are skipped, as kohya's glob skips them.
    kohya never reads repeats from the dataset folder's own name, so neither do we.
    """
    top = _Folder(root, 1, "images directly in the dataset folder: 1 repeat (subfolders like 10_name set repeats)")
    pending = [(top, root.resolve())]
    seen = {root.resolve()}
    found = []
    while pending:
        folder, resolved = pending.pop()
        try:
            # real folders before links to them, so a folder is reported under its own name
            entries = sorted(
                (p for p in folder.path.iterdir() if not p.name.startswith(".")), key=lambda p: (p.is_symlink(), p.name)
            )
        except OSError as error:
            message = f"{folder.path}: cannot list it ({error}); check its permissions"
            problems.append(ScanProblem(folder.path, "unreadable_folder", message, skipped=True))
            continue
        files = []
        for entry in entries:
            if entry.is_dir():
                target = entry.resolve()
                if target in seen and resolved.is_relative_to(target):
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
                    pending.append((_subfolder(entry, folder), target))
            elif entry.is_file():
                files.append(entry)
            elif entry.is_symlink():
                problems.append(ScanProblem(entry, "broken_link", f"{entry}: link to a missing file; fix or remove it"))
        found.append((folder, files))
    return sorted(found, key=lambda pair: pair[0].path)


def read_caption(path: Path) -> tuple[str, str | None]:
    """The caption text, whitespace collapsed, and a warning when it was not UTF-8.

    kohya keeps only the first line; we join all lines, since a caption wrapped by an editor is one caption.
    """
    raw = path.read_bytes()
    warning = None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows Notepad's "Unicode" is UTF-16 with a BOM
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text, encoding = raw.decode("cp1252"), "Windows-1252"
            except UnicodeDecodeError:
                text, encoding = raw.decode("latin-1"), "Latin-1"
            warning = f"{path}: caption is not UTF-8; read it as {encoding}; re-save it as UTF-8 if accents look wrong"
    return " ".join(text.split()), warning


def _caption_for(scan: DatasetScan, image: Path, caption_extension: str) -> str:
    """The image's caption, "" when missing, empty or unreadable, each reported (training goes on)."""
    caption_path = image.with_suffix(caption_extension)
    fallback = "training uses an empty caption (plus the trigger word if set)"
    if not caption_path.is_file():
        scan.problems.append(
            ScanProblem(image, "missing_caption", f"{image}: no caption file {caption_path.name}; {fallback}")
        )
        return ""
    try:
        caption, warning = read_caption(caption_path)
    except OSError as error:
        scan.problems.append(
            ScanProblem(caption_path, "unreadable_caption", f"{caption_path}: cannot read it ({error}); {fallback}")
        )
        return ""
    if warning:
        scan.problems.append(ScanProblem(caption_path, "caption_encoding", warning))
    if not caption:
        scan.problems.append(
            ScanProblem(caption_path, "empty_caption", f"{caption_path}: caption is empty; {fallback}")
        )
    return caption


def _add_image(scan: DatasetScan, path: Path, folder: _Folder, caption_extension: str) -> None:
    try:
        probe = probe_image(path)
    except ImageLoadError as error:
        scan.problems.append(ScanProblem(path, error.kind, str(error), skipped=True))
        return
    if min(probe.width, probe.height) < MIN_IMAGE_SIDE:
        scan.problems.append(
            ScanProblem(
                path,
                "too_small",
                f"{path}: {probe.width}x{probe.height} is too small to train on (under {MIN_IMAGE_SIDE} px a side); "
                "replace it with a larger version or remove it",
                skipped=True,
            )
        )
        return
    if probe.format not in FORMATS_FOR_EXTENSION[path.suffix.lower()]:
        scan.problems.append(
            ScanProblem(
                path,
                "format_mismatch",
                f"{path}: the file is {probe.format} although named {path.suffix}; it is read as {probe.format}, "
                "but other tools may refuse it: rename or re-export it",
            )
        )
    caption = _caption_for(scan, path, caption_extension)
    scan.items.append(ImageItem(path, caption, folder.repeats, folder.path, probe.width, probe.height))


def _report_shared_captions(scan: DatasetScan, caption_extension: str) -> None:
    """a.png and a.jpg both read a.txt: almost always a leftover duplicate, so say which."""
    by_stem: dict[Path, list[Path]] = defaultdict(list)
    for item in scan.items:
        by_stem[item.path.with_suffix("")].append(item.path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            scan.problems.append(
                ScanProblem(
                    stem.with_suffix(caption_extension),
                    "shared_caption",
                    f"{names} share one caption name {stem.name}{caption_extension}; rename or remove the duplicate",
                )
            )


def _no_usable_images(scan: DatasetScan) -> DatasetError:
    reasons = [p.message for p in scan.problems if p.skipped][:5]
    reasons += [f"{f.path}: {f.note}" for f in scan.folders if f.repeats == 0][:5]
    if scan.ignored_files:
        others = ", ".join(f"{count} {ext}" for ext, count in scan.ignored_files.items())
        reasons.append(f"other files found: {others} (images must be {', '.join(sorted(IMAGE_EXTENSIONS))})")
    details = "".join(f"\n  {reason}" for reason in reasons)
    return DatasetError.at(scan.root, f"no usable images;{details}\nto fix: {DATASET_FIX}")


def scan_dataset(root: Path, caption_extension: str = ".txt") -> DatasetScan:
    """Every usable image under ``root`` with its caption and repeats, plus what was skipped and why."""
    root = Path(root)
    if not root.exists():
        raise DatasetError.at(root, f"dataset folder does not exist; check the path, then {DATASET_FIX}")
    if not root.is_dir():
        raise DatasetError.at(root, f"is a file, not a folder; give the folder that holds the images and {DATASET_FIX}")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension  # as kohya does: "txt" means ".txt"
    scan = DatasetScan(root)
    ignored: Counter[str] = Counter()
    for folder, files in _walk(root, scan.problems):
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        captions = {image.with_suffix(caption_extension) for image in images}
        ignored.update(
            f.suffix.lower() or "(none)"
            for f in files
            if f not in captions and f.suffix.lower() not in IMAGE_EXTENSIONS
        )
        if not images:
            continue
        scan.folders.append(FolderReport(folder.path, folder.repeats, len(images), folder.note))
        if folder.repeats > 0:
            for path in images:
                _add_image(scan, path, folder, caption_extension)
    scan.ignored_files = dict(sorted(ignored.items()))
    _report_shared_captions(scan, caption_extension)
    if not scan.items:
        raise _no_usable_images(scan)
    return scan
