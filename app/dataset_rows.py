"""What the Dataset tab lists: one row per picture a run finds in the dataset, with its role and problems.

The rows come from the scan and report that check-data and a run use (``scan_configured``,
``check_configured``), so the tab shows what trains: usable images with their repeats and bucket, held-out
validation images, parked ones (in a ``0_`` folder), and the pictures left out (unreadable or too small, in a
type we do not read) with the reason. Each check-data problem is attached to the image it concerns, its
caption file's included, so a filter by problem kind finds the images to fix. Other unused files (latent
caches, notes) are counted, not listed: check-data's report names them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.buckets import assign_bucket, make_buckets
from trainer.data.check import DataReport
from trainer.data.folders import ScanProblem
from trainer.data.scan import IMAGE_EXTENSIONS, DatasetScan, read_caption
from trainer.data.subsets import SubsetFolder
from trainer.data.tag_stats import CAPTION_TOKENS, TOKEN_COUNT

# Pictures in types we do not read, listed so nobody believes they trained (KNOWN_OTHER_FILES says why).
UNREAD_PICTURES = {".psd", ".heic", ".svg", ".avif", ".jxl"}
# The scan's names for files left out that are pictures, and the role the tab gives them.
LEFT_OUT_ROLES = {
    "parked": "parked",
    "regularization_unused": "not used",
    "hidden": "not used",
    "not_used": "not used",
    "unreadable": "skipped",
    "too_large": "skipped",
    "too_small": "skipped",
}
NO_PREVIEW_KINDS = {"unreadable", "too_large", "not_used"}
COLUMNS = ["file", "folder", "role", "repeats", "bucket", "caption", "problems"]


@dataclass
class DatasetRow:
    path: Path
    role: str  # train, regularization, validation; parked, not used, skipped
    repeats: int = 0
    bucket: str = ""  # "WxH" for images a run trains or validates on
    caption: str = ""  # as training reads it (a missing caption's fallback included); left out: the file's
    problems: list[ScanProblem] = field(default_factory=list)

    @property
    def previewable(self) -> bool:
        """Whether the file has pixels to show; the others get the placeholder and their reason."""
        return not any(problem.kind in NO_PREVIEW_KINDS for problem in self.problems)

    def problem_lines(self) -> list[str]:
        """Each problem as ``kind: message``, the message without the file's path it starts with."""
        return [f"{p.kind}: {p.message.removeprefix(f'{p.path}: ')}" for p in self.problems]


def caption_file(image: Path, subset: SubsetFolder) -> Path:
    """The image's caption file (``SubsetFolder`` takes "txt" as ".txt", as the scan does)."""
    return image.with_suffix(subset.caption_extension)


def subset_of(subsets: list[SubsetFolder], path: Path) -> SubsetFolder | None:
    """The subset a file belongs to: the innermost subset folder holding it (subsets may nest)."""
    holding = [s for s in subsets if path.is_relative_to(s.path)]
    return max(holding, key=lambda s: len(s.path.parts)) if holding else None


def view_root(subsets: list[SubsetFolder]) -> Path:
    """The folder the rows' file names are relative to: the one dataset folder, or what the subsets share."""
    return Path(os.path.commonpath([s.path for s in subsets]))


def _left_out_caption(path: Path, subsets: list[SubsetFolder]) -> str:
    subset = subset_of(subsets, path)
    caption = caption_file(path, subset) if subset else None
    try:
        return read_caption(caption)[0] if caption and caption.is_file() else ""
    except OSError:
        return ""


def dataset_rows(scan: DatasetScan, report: DataReport) -> list[DatasetRow]:
    """Every image and every left-out picture of the scan, sorted by path, each with its problems."""
    buckets, spec = make_buckets(report.bucket_spec), report.bucket_spec
    rows = {}
    for item in scan.items + scan.held_out:
        bucket = "{}x{}".format(*assign_bucket(item.width, item.height, buckets, spec))
        rows[item.path] = DatasetRow(item.path, item.role, item.repeats, bucket, item.caption)
    for left_out in report.problems + report.other_files:
        path, suffix = left_out.path, left_out.path.suffix.lower()
        is_picture = suffix in IMAGE_EXTENSIONS or suffix in UNREAD_PICTURES
        if left_out.kind in LEFT_OUT_ROLES and is_picture and path not in rows:
            rows[path] = DatasetRow(path, LEFT_OUT_ROLES[left_out.kind], caption=_left_out_caption(path, scan.subsets))
    problems: dict[Path, list[ScanProblem]] = {}
    for problem in report.problems + report.other_files:
        problems.setdefault(problem.path, []).append(problem)
    for path, tokens in report.tags.long_captions:
        message = f"{tokens} tokens or more ({TOKEN_COUNT}): training cuts it after {CAPTION_TOKENS}; shorten it"
        problems.setdefault(path, []).append(ScanProblem(path, "long_caption", message))
    for path, row in rows.items():
        subset = subset_of(scan.subsets, path)
        caption = caption_file(path, subset) if subset else None
        row.problems = problems.get(path, []) + (problems.get(caption, []) if caption != path else [])
    return sorted(rows.values(), key=lambda row: row.path.as_posix())


def filter_rows(rows: list[DatasetRow], tag: str, kind: str) -> list[DatasetRow]:
    """Rows with a caption tag containing ``tag`` (any letter case) and a problem of ``kind`` ("*": any)."""
    needle = tag.strip().lower()
    kept = []
    for row in rows:
        if needle and not any(needle in part.strip().lower() for part in row.caption.split(",")):
            continue
        kinds = {problem.kind for problem in row.problems}
        if kind and not (kinds if kind == "*" else kind in kinds):
            continue
        kept.append(row)
    return kept


def problem_counts(rows: list[DatasetRow]) -> Counter[str]:
    """Images per problem kind, for the filter's choices."""
    return Counter(kind for row in rows for kind in {problem.kind for problem in row.problems})


def table(rows: list[DatasetRow], root: Path) -> list[list[object]]:
    """The rows as the tab's table shows them (``COLUMNS``), file and folder relative to ``root``."""
    return [
        [
            row.path.relative_to(root).as_posix(),
            row.path.parent.relative_to(root).as_posix(),
            row.role,
            row.repeats,
            row.bucket,
            row.caption,
            "\n".join(row.problem_lines()),
        ]
        for row in rows
    ]


def tag_summary(report: DataReport) -> str:
    """The most frequent tags and the tags on every image, as a line of Markdown each."""
    stats = report.tags
    tags = " · ".join(f"`{tag}` {count}" for tag, count in stats.most_frequent) or "no captions yet"
    lines = [f"**Tags** (images of {stats.training_images} training images): {tags}"]
    if stats.on_every_image:
        every = ", ".join(f"`{tag}`" for tag in stats.on_every_image)
        lines.append(f"**On every image** (the trigger word, or tags to prune: they teach nothing apart): {every}")
    return "\n\n".join(lines)
