"""``dora-studio check-data``: what a training run would see in a dataset folder, before any model loads.

Folders and repeats, caption gaps, files left out and why, the bucket each image lands in, and the steps
per epoch counted as kohya counts them, so the numbers match what sd-scripts users expect.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .buckets import BucketSpec, assign_bucket, make_buckets
from .scan import DatasetScan, FolderReport, ScanProblem, scan_dataset

# Enlarging more than this makes soft, blurry training targets; worth a warning, not a refusal.
UPSCALE_WARNING = 2.0


@dataclass
class DataReport:
    root: Path
    folders: list[FolderReport]
    problems: list[ScanProblem]
    ignored_files: dict[str, int]
    image_count: int
    repeated_image_count: int  # images per epoch, repeats included
    bucket_counts: dict[tuple[int, int], int]  # (width, height) -> images per epoch in it
    batch_size: int
    # kohya's "steps": batches per epoch, which are optimizer steps when gradient_accumulation is 1
    steps_per_epoch: int
    bucket_spec: BucketSpec

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "image_count": self.image_count,
            "repeated_image_count": self.repeated_image_count,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "bucket_spec": self.bucket_spec.__dict__,
            "buckets": {f"{w}x{h}": count for (w, h), count in self.bucket_counts.items()},
            "folders": [{**f.__dict__, "path": str(f.path)} for f in self.folders],
            "problems": [{**p.__dict__, "path": str(p.path)} for p in self.problems],
            "ignored_files": self.ignored_files,
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
    return DataReport(
        root=scan.root,
        folders=scan.folders,
        problems=problems,
        ignored_files=scan.ignored_files,
        image_count=len(scan.items),
        repeated_image_count=scan.total_repeated_images,
        bucket_counts=counts,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch(counts, batch_size),
        bucket_spec=bucket_spec,
    )


def format_report(report: DataReport) -> str:
    lines = [
        f"dataset {report.root}: {report.image_count} images, {report.repeated_image_count} per epoch with repeats",
        "",
        "folders:",
    ]
    for folder in report.folders:
        shown = folder.path.relative_to(report.root) if folder.path != report.root else Path(".")
        lines.append(f"  {shown!s:<32} {folder.image_count:>5} images  {folder.note}")
    lines += ["", f"buckets at resolution {report.bucket_spec.resolution} (width x height: images per epoch):"]
    lines += [f"  {w:>4}x{h:<4} {count:>6}" for (w, h), count in report.bucket_counts.items()]
    lines += ["", f"steps per epoch at batch size {report.batch_size}: {report.steps_per_epoch}"]
    skipped = [p for p in report.problems if p.skipped]
    warnings = [p for p in report.problems if not p.skipped]
    for title, problems in (("skipped", skipped), ("warnings", warnings)):
        if problems:
            lines += ["", f"{title} ({len(problems)}):"]
            lines += [f"  [{p.kind}] {p.message}" for p in problems]
    if report.ignored_files:
        others = ", ".join(f"{count} {ext}" for ext, count in report.ignored_files.items())
        lines += ["", f"other files, not used: {others}"]
    return "\n".join(lines)
