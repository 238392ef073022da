"""Find the training images under the dataset's folders, kohya-style, and name every file that is not used.

Folders named ``N_name`` give their images N repeats (kohya sd-scripts' DreamBooth layout) and, for images
without a caption file, the caption ``name`` (kohya's class tokens); captions are same-name text files beside
the images. Every image is checked here without a full decode (header and chunk checksums; JPEG data at 1/8
scale), so a broken file is reported before training rather than crashing it hours in. Every other file is
named in the report with the reason it is left out, so nobody believes they trained on a ``.psd``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import DatasetError, ImageLoadError

from .folders import Folder, ScanProblem, walk_subset
from .image_io import ImageProbe, probe_image
from .masks import MaskFinder, MaskSource
from .subsets import SubsetFolder, balance_regularization, held_out_indices

# kohya's IMAGE_EXTENSIONS (any letter case), plus what Pillow reads safely and users bring: scans as TIFF,
# GIFs (first frame), JPEG's other names
FORMATS_FOR_EXTENSION = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},  # MPO: camera JPEGs carrying a second picture
    ".jpe": {"JPEG", "MPO"},
    ".jfif": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP", "DIB"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".gif": {"GIF"},
}
IMAGE_EXTENSIONS = set(FORMATS_FOR_EXTENSION)
# what else is commonly found beside training images, and what to say about it
KNOWN_OTHER_FILES = {
    ".npz": "a latent cache of another trainer (kohya); not needed here",
    ".psd": "a Photoshop file: export it as PNG to train on it",
    ".heic": "HEIC is not read: export it as JPEG or PNG to train on it",
    ".svg": "a vector drawing: export it as PNG to train on it",
}
# Below 64 px a side is under 8 latent pixels: training would upscale almost no information 8x or more,
# and with bucket_no_upscale the bucket (the size rounded down to 64) would be empty; kohya crashes there.
MIN_IMAGE_SIDE = 64
DATASET_FIX = "put images with same-name .txt captions in it, or in subfolders named like 10_mychar for 10 repeats"


@dataclass
class ImageItem:
    path: Path
    caption: str  # whitespace collapsed; "" when missing or empty (the trigger word is added later)
    repeats: int
    folder: Path
    width: int  # upright, after EXIF orientation
    height: int
    subset: int = 0  # index into DatasetScan.subsets
    role: str = "train"  # its subset's role: train, regularization or validation
    mask: MaskSource | None = None  # its loss mask with dataset.masked_loss (``masks.MaskFinder``), else None


@dataclass
class FolderReport:
    path: Path
    repeats: int
    image_count: int  # image files found, including ones skipped for being broken
    note: str
    subset: int = 0


@dataclass
class DatasetScan:
    root: Path  # the first subset's folder
    subsets: list[SubsetFolder] = field(default_factory=list)
    items: list[ImageItem] = field(default_factory=list)  # what trains: training and regularization images
    held_out: list[ImageItem] = field(default_factory=list)  # validation images, never trained on
    folders: list[FolderReport] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)  # what is wrong: broken images, missing captions
    other_files: list[ScanProblem] = field(default_factory=list)  # every other file not trained on, and why

    @property
    def ignored_files(self) -> dict[str, int]:
        """Files that are not images (captions without an image included), counted by extension."""
        counts = Counter(
            p.path.suffix.lower() or "(none)" for p in self.other_files if p.kind in ("not_used", "orphan_caption")
        )
        return dict(sorted(counts.items()))

    @property
    def total_repeated_images(self) -> int:
        """Images one epoch shows, as kohya counts them: each image once per repeat."""
        return sum(item.repeats for item in self.items)

    def repeated_count(self, role: str) -> int:
        """Images of one role an epoch shows, repeats included (validation: each once)."""
        return sum(item.repeats for item in self.items + self.held_out if item.role == role)

    def _folder_name(self, item: ImageItem) -> str:
        root = self.subsets[item.subset].path if self.subsets else self.root
        name = item.folder.relative_to(root).as_posix() if item.folder != root else root.name
        return f"{root.name}/{name}" if len(self.subsets) > 1 and item.folder != root else name

    def folder_counts(self, role: str = "train") -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs`` (``ss_reg_dataset_dirs`` for role "regularization"): per folder (relative
        to its subset's), its repeats and usable images."""
        counts: dict[str, dict[str, int]] = {}
        for item in (item for item in self.items if item.role == role):
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


def _caption_for(scan: DatasetScan, image: Path, subset: SubsetFolder, folder: Folder) -> str:
    """The image's caption; without a caption file, kohya's class tokens (the subset's, else the ``N_name``
    folder's name); "" when there is none, each case reported (training goes on)."""
    caption_path = image.with_suffix(subset.caption_extension)
    class_tokens = subset.class_tokens or folder.class_tokens
    fallback = (
        f"training uses the class tokens {class_tokens!r} as its caption (as kohya does)"
        if class_tokens
        else "training uses an empty caption (plus the trigger word if set)"
    )
    if not caption_path.is_file():
        scan.problems.append(
            ScanProblem(image, "missing_caption", f"{image}: no caption file {caption_path.name}; {fallback}")
        )
        return class_tokens
    try:
        caption, warning = read_caption(caption_path)
    except OSError as error:
        scan.problems.append(
            ScanProblem(caption_path, "unreadable_caption", f"{caption_path}: cannot read it ({error}); {fallback}")
        )
        return class_tokens
    if warning:
        scan.problems.append(ScanProblem(caption_path, "caption_encoding", warning))
    if not caption:
        scan.problems.append(
            ScanProblem(caption_path, "empty_caption", f"{caption_path}: caption is empty; {fallback}")
        )
        return class_tokens
    return caption


def _probe_usable(scan: DatasetScan, path: Path) -> ImageProbe | None:
    """The image's size and format, or None with the reason it cannot train recorded."""
    try:
        probe = probe_image(path)
    except ImageLoadError as error:
        scan.problems.append(ScanProblem(path, error.kind, str(error), skipped=True))
        return None
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
        return None
    if probe.format not in FORMATS_FOR_EXTENSION[path.suffix.lower()]:
        scan.problems.append(
            ScanProblem(
                path,
                "format_mismatch",
                f"{path}: the file is {probe.format} although named {path.suffix}; it is read as {probe.format}, "
                "but other tools may refuse it: rename or re-export it",
            )
        )
    return probe


def _report_shared_captions(scan: DatasetScan) -> None:
    """a.png and a.jpg both read a.txt: almost always a leftover duplicate, so say which."""
    by_stem: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for item in scan.items + scan.held_out:
        by_stem[item.path.with_suffix(""), scan.subsets[item.subset].caption_extension].append(item.path)
    for (stem, extension), paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            scan.problems.append(
                ScanProblem(
                    stem.with_suffix(extension),
                    "shared_caption",
                    f"{names} share one caption name {stem.name}{extension}; rename or remove the duplicate",
                )
            )


def _other_file(scan: DatasetScan, path: Path) -> None:
    """Name a file that is not a training image, and why, so nobody believes it trained."""
    extension = path.suffix.lower()
    reason = KNOWN_OTHER_FILES.get(extension) or (
        f"not an image type we read (images are {', '.join(sorted(IMAGE_EXTENSIONS))})"
        if extension
        else "no file extension: name it like image.png if it is an image"
    )
    scan.other_files.append(ScanProblem(path, "not_used", f"{path}: {reason}", skipped=True))


def _scan_subset(scan: DatasetScan, index: int, excluded: dict[Path, str]) -> None:
    """Add one subset's images (or, for a parked folder, their names) and its other files to ``scan``."""
    subset = scan.subsets[index]
    for folder, files in walk_subset(subset, scan.problems, scan.other_files, excluded, IMAGE_EXTENSIONS):
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        captions = {image.with_suffix(subset.caption_extension) for image in images}
        for other in files:
            if other not in captions and other.suffix.lower() not in IMAGE_EXTENSIONS:
                if other.suffix.lower() == subset.caption_extension.lower():
                    message = f"{other}: a caption without an image of the same name; not used"
                    scan.other_files.append(ScanProblem(other, "orphan_caption", message, skipped=True))
                else:
                    _other_file(scan, other)
        if not images:
            continue
        scan.folders.append(FolderReport(folder.path, folder.repeats, len(images), folder.note, index))
        for path in images:
            if folder.repeats == 0:
                message = (
                    f"{path}: in {folder.repeat_source}, a 0-repeat (parked) folder; rename the folder to train it"
                )
                scan.other_files.append(ScanProblem(path, "parked", message, skipped=True))
                continue
            probe = _probe_usable(scan, path)
            if probe is None:
                continue
            caption = _caption_for(scan, path, subset, folder)
            repeats = 1 if subset.role == "validation" else folder.repeats
            item = ImageItem(path, caption, repeats, folder.path, probe.width, probe.height, index, subset.role)
            (scan.held_out if subset.role == "validation" else scan.items).append(item)


def _balance(scan: DatasetScan) -> None:
    """kohya's regularization balancing (``subsets.balance_regularization``); unused images are named."""
    train = [item for item in scan.items if item.role == "train"]
    regularization = [item for item in scan.items if item.role == "regularization"]
    if not regularization:
        return
    balanced = balance_regularization(sum(item.repeats for item in train), [item.repeats for item in regularization])
    for item, repeats in zip(regularization, balanced):
        if repeats == 0:
            message = (
                f"{item.path}: not used: the regularization images before it already match the training images' "
                "count (kohya's balancing); fewer regularization images would do"
            )
            scan.other_files.append(ScanProblem(item.path, "regularization_unused", message, skipped=True))
        item.repeats = repeats
    scan.items = train + [item for item in regularization if item.repeats > 0]


def _hold_out(scan: DatasetScan, count: int, seed: int) -> None:
    """Move ``count`` training images (never regularization ones) to ``held_out``, chosen by seed."""
    train = [item for item in scan.items if item.role == "train"]
    if count >= len(train):
        raise DatasetError.at(
            "validation.images",
            f"{count} held out of {len(train)} training images leaves none to train on; hold out fewer",
        )
    chosen = held_out_indices([item.path for item in train], count, seed)
    for index, item in enumerate(train):
        if index in chosen:
            item.role, item.repeats = "validation", 1
            scan.held_out.append(item)
    scan.items = [item for item in scan.items if item.role != "validation"]


def _check_folders(subsets: list[SubsetFolder]) -> None:
    for index, subset in enumerate(subsets):
        where = "dataset folder" if len(subsets) == 1 else f"subset {index} ({subset.role}) folder"
        if not subset.path.exists():
            raise DatasetError.at(subset.path, f"{where} does not exist; check the path, then {DATASET_FIX}")
        if not subset.path.is_dir():
            raise DatasetError.at(
                subset.path, f"{where} is a file, not a folder; give the folder that holds the images and {DATASET_FIX}"
            )
        if subset.mask_path is not None and not subset.mask_path.is_dir():
            raise DatasetError.at(subset.mask_path, f"mask folder of {where} does not exist or is not a folder")


def _check_not_empty(scan: DatasetScan, index: int) -> None:
    """A subset that gives no image is a typo or a mistake, not something to train around silently."""
    if any(item.subset == index for item in scan.items + scan.held_out):
        return
    subset = scan.subsets[index]
    reasons = [p.message for p in scan.problems + scan.other_files if p.path.is_relative_to(subset.path)][:3]
    details = "".join(f"\n  {reason}" for reason in reasons)
    raise DatasetError.at(
        subset.path,
        f"subset {index} ({subset.role}) has no usable images;{details}\nto fix: put images in it, correct "
        "its path, or set its repeats = 0 to leave it out",
    )


def _excluded_folders(subsets: list[SubsetFolder], index: int) -> dict[Path, str]:
    """Folders inside subset ``index`` that belong to something else: other subsets, mask folders."""
    excluded = {other.path.resolve(): f"subset {i} ({other.role})" for i, other in enumerate(subsets) if i != index}
    excluded |= {s.mask_path.resolve(): "a mask folder" for s in subsets if s.mask_path is not None}
    excluded.pop(subsets[index].path.resolve(), None)
    return excluded


def scan_subsets(
    subsets: list[SubsetFolder], held_out_images: int = 0, seed: int = 0, masked_loss: bool = False
) -> DatasetScan:
    """Every usable image of every subset with its caption and repeats (regularization balanced, a
    validation split held out), plus every file left out and why.

    Images of a subset with a ``mask_path`` get their mask file; with ``masked_loss`` (dataset.masked_loss)
    the others use their alpha channel. Masks that cannot be used raise ``DatasetError`` here, before training.
    """
    if not subsets:
        raise DatasetError.at("dataset.path", f"no dataset folder given; {DATASET_FIX}")
    _check_folders(subsets)
    scan = DatasetScan(subsets[0].path, subsets)
    for index in range(len(subsets)):
        _scan_subset(scan, index, _excluded_folders(subsets, index))
        if len(subsets) > 1 and subsets[index].repeats != 0:
            _check_not_empty(scan, index)
    _report_shared_captions(scan)
    if not any(item.role == "train" for item in scan.items):
        raise _no_usable_images(scan)
    _balance(scan)
    if held_out_images:
        _hold_out(scan, held_out_images, seed)
    masks = MaskFinder(subsets, masked_loss, IMAGE_EXTENSIONS)
    for item in scan.items + scan.held_out:
        item.mask = masks.source(item.path, item.subset, (item.width, item.height))
    scan.problems += masks.problems
    masks.check()
    return scan


def _no_usable_images(scan: DatasetScan) -> DatasetError:
    reasons = [p.message for p in scan.problems if p.skipped][:5]
    reasons += [f"{f.path}: {f.note}" for f in scan.folders if f.repeats == 0][:5]
    if scan.ignored_files:
        others = ", ".join(f"{count} {ext}" for ext, count in scan.ignored_files.items())
        reasons.append(f"other files found: {others} (images must be {', '.join(sorted(IMAGE_EXTENSIONS))})")
    details = "".join(f"\n  {reason}" for reason in reasons)
    roots = [s.path for s in scan.subsets if s.role == "train"] or [scan.root]
    return DatasetError.at(roots[0], f"no usable images to train on;{details}\nto fix: {DATASET_FIX}")


def scan_dataset(root: Path, caption_extension: str = ".txt") -> DatasetScan:
    """The simple case: one folder of training images (``N_name`` sub-folders for repeats)."""
    return scan_subsets([SubsetFolder(Path(root), caption_extension=caption_extension)])
