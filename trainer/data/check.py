"""``dora-studio check-data``: what a training run would see in a dataset folder, before any model loads.

Folders and repeats, caption gaps, files left out and why, the bucket each image lands in, and the steps
per epoch counted as kohya counts them, so the numbers match what sd-scripts users expect; then the tags the
captions use and the captions too long for the text encoders (``tag_stats``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import BucketSpec, assign_bucket, make_buckets
from .scan import DatasetScan, FolderReport, ScanProblem, scan_dataset
from .subsets import ROLES, SubsetFolder
from .tag_stats import TagStats, format_tag_stats, tag_statistics

# Enlarging more than this makes soft, blurry training targets; worth a warning, not a refusal.
UPSCALE_WARNING = 2.0


@dataclass
class DataReport:
    root: Path
    subsets: list[SubsetFolder]
    folders: list[FolderReport]
    problems: list[ScanProblem]
    other_files: list[ScanProblem]  # every file not trained on that is not a problem, with the reason
    ignored_files: dict[str, int]
    image_count: int  # trained images: training and regularization
    repeated_image_count: int  # images per epoch, repeats included
    role_counts: dict[str, dict[str, int]]  # role -> {"images": n, "per_epoch": n with repeats}
    bucket_counts: dict[tuple[int, int], int]  # (width, height) -> images per epoch in it
    batch_size: int
    # kohya's "steps": batches per epoch, which are optimizer steps when gradient_accumulation is 1
    steps_per_epoch: int
    bucket_spec: BucketSpec
    tags: TagStats = field(default_factory=TagStats)

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "subsets": [
                {"path": str(s.path), "role": s.role, "repeats": s.repeats, "caption_extension": s.caption_extension}
                for s in self.subsets
            ],
            "roles": self.role_counts,
            "image_count": self.image_count,
            "repeated_image_count": self.repeated_image_count,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "bucket_spec": self.bucket_spec.__dict__,
            "buckets": {f"{w}x{h}": count for (w, h), count in self.bucket_counts.items()},
            "folders": [{**f.__dict__, "path": str(f.path)} for f in self.folders],
            "problems": [{**p.__dict__, "path": str(p.path)} for p in self.problems],
            "other_files": [{**p.__dict__, "path": str(p.path)} for p in self.other_files],
            "ignored_files": self.ignored_files,
            "tags": self.tags.to_json(),
        }


def steps_per_epoch(bucket_counts: dict[tuple[int, int], int], batch_size: int) -> int:
    """kohya's count of batches per epoch: a batch never mixes buckets, so each bucket's last may be short."""
    return sum(math.ceil(count / batch_size) for count in bucket_counts.values())


def check_dataset(root: Path, caption_extension: str, bucket_spec: BucketSpec, batch_size: int) -> DataReport:
    """Scan ``root`` and bucket every image; raises ``DatasetError`` when nothing is usable."""
    return report_for_scan(scan_dataset(Path(root), caption_extension), bucket_spec, batch_size)


def report_for_scan(scan: DatasetScan, bucket_spec: BucketSpec, batch_size: int) -> DataReport:
    """The report on an existing scan (training scans once and reports from the same scan)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be 1 or more, got {batch_size}")
    buckets = make_buckets(bucket_spec)
    bucket_counts: Counter[tuple[int, int]] = Counter()
    problems = list(scan.problems)
    for item in scan.items:
        bucket = assign_bucket(item.width, item.height, buckets, bucket_spec)
        bucket_counts[bucket] += item.repeats
        upscale = max(bucket[0] / item.width, bucket[1] / item.height)
        if upscale > UPSCALE_WARNING:
            problems.append(
                ScanProblem(
                    item.path,
                    "upscaled",
                    f"{item.path}: {item.width}x{item.height} is enlarged {upscale:.1f}x to its "
                    f"{bucket[0]}x{bucket[1]} bucket and will train soft; use a larger version if you have one",
                )
            )
    counts = dict(sorted(bucket_counts.items()))
    roles = {
        role: {
            "images": sum(i.role == role for i in scan.items + scan.held_out),
            "per_epoch": scan.repeated_count(role),
        }
        for role in ROLES
    }
    return DataReport(
        root=scan.root,
        subsets=scan.subsets,
        folders=scan.folders,
        problems=problems,
        other_files=scan.other_files,
        ignored_files=scan.ignored_files,
        image_count=len(scan.items),
        repeated_image_count=scan.total_repeated_images,
        role_counts={role: count for role, count in roles.items() if count["images"]},
        bucket_counts=counts,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch(counts, batch_size),
        bucket_spec=bucket_spec,
        tags=tag_statistics(scan),
    )


def _shown(path: Path, root: Path) -> str:
    return "." if path == root else path.relative_to(root).as_posix()


def format_report(report: DataReport) -> str:
    roles = report.role_counts
    train = roles.get("train", {"images": 0, "per_epoch": 0})
    lines = [f"dataset {report.root}: {train['images']} training images, {train['per_epoch']} per epoch with repeats"]
    if "regularization" in roles:
        reg = roles["regularization"]
        lines.append(f"  regularization: {reg['images']} images, {reg['per_epoch']} per epoch (balanced as kohya does)")
    if "validation" in roles:
        lines.append(f"  validation: {roles['validation']['images']} images held out (measured, never trained)")
    for index, subset in enumerate(report.subsets):
        if len(report.subsets) > 1:
            lines += ["", f"subset {index}: {subset.path} ({subset.role})"]
        else:
            lines += ["", "folders:"]
        for folder in (f for f in report.folders if f.subset == index):
            shown = _shown(folder.path, subset.path)
            lines.append(f"  {shown:<32} {folder.image_count:>5} images  {folder.note}")
    lines += ["", f"buckets at resolution {report.bucket_spec.resolution} (width x height: images per epoch):"]
    lines += [f"  {w:>4}x{h:<4} {count:>6}" for (w, h), count in report.bucket_counts.items()]
    lines += ["", f"steps per epoch at batch size {report.batch_size}: {report.steps_per_epoch}"]
    lines += ["", *format_tag_stats(report.tags)]
    skipped = [p for p in report.problems if p.skipped]
    warnings = [p for p in report.problems if not p.skipped]
    for title, problems in (
        ("skipped", skipped),
        ("warnings", warnings),
        ("other files, not used", report.other_files),
    ):
        if problems:
            lines += ["", f"{title} ({len(problems)}):"]
            lines += [f"  [{p.kind}] {p.message}" for p in problems]
    return "\n".join(lines)
