"""Caption every image a training run would find, in batches, naming each one that could not be done.

The images are the dataset scan's (``data.scan``: ``N_name`` folders, hidden files, parked folders, image
types and unreadable files exactly as training sees them); regularization images are left alone, since their
caption is the class on purpose. An image that cannot be read, or a caption that cannot be written, is
reported with the fix and the others are still captioned; anything else (the model failing, Ctrl-C) stops
the run, and running it again continues where it stopped (``journal``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from trainer.data.image_io import load_image_rgb
from trainer.data.scan import DatasetScan
from trainer.errors import ImageLoadError, Problem

from .journal import Journal
from .models import CaptionModel, open_caption_model
from .options import MODES, ModelSettings
from .writer import compose_caption, existing_caption, write_caption

CAPTIONED_ROLES = ("train", "validation")
UNREADABLE_KINDS = ("unreadable", "too_large")  # the scan's kinds for images that cannot be decoded


@dataclass(frozen=True)
class CaptionPlan:
    """What to write, whichever model writes it."""

    mode: str = "missing"  # one of options.MODES
    trigger: str = ""  # first in every caption
    always_tags: tuple[str, ...] = ()  # after the trigger, in every caption
    dry_run: bool = False  # print what would be written; write nothing

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class CaptionReport:
    model: str  # what ran, and where
    written: int = 0
    unchanged: int = 0  # append mode: the caption already had every tag
    already_captioned: int = 0  # missing mode: skipped
    resumed: int = 0  # written by an interrupted run with the same settings
    previews: list[str] = field(default_factory=list)  # dry run: "caption file: caption"
    failed: list[Problem] = field(default_factory=list)


def _targets(scan: DatasetScan) -> list[tuple[Path, Path]]:
    """(image, caption file) for every image to caption, in the scan's order."""
    return [
        (item.path, item.path.with_suffix(scan.subsets[item.subset].caption_extension))
        for item in scan.items + scan.held_out
        if item.role in CAPTIONED_ROLES
    ]


def _journal(scan: DatasetScan, model_folder: Path, settings: ModelSettings, plan: CaptionPlan) -> Journal:
    """The record of this run's settings (where the model runs and in what batches does not change a caption)."""
    record = {
        "model": Path(model_folder).resolve().as_posix(),
        "settings": dataclasses.asdict(dataclasses.replace(settings, device="", batch_size=0)),
        "plan": dataclasses.asdict(plan),
    }
    return Journal(scan.root, record)


def _todo(
    targets: list[tuple[Path, Path]], plan: CaptionPlan, journal: Journal | None, report: CaptionReport
) -> list[tuple[Path, Path]]:
    """The targets still to caption; the rest counted in ``report``."""
    todo = []
    for image, caption_path in targets:
        if journal is not None and image in journal:
            report.resumed += 1
            continue
        if plan.mode == "missing":
            try:
                if existing_caption(caption_path):
                    report.already_captioned += 1
                    continue
            except OSError as error:
                report.failed.append(_unreadable_caption(caption_path, error))
                continue
        todo.append((image, caption_path))
    return todo


def _unreadable_caption(path: Path, error: OSError) -> Problem:
    return Problem(str(path), f"cannot read the caption file ({error}); check its permissions, then run again")


def caption_scan(
    scan: DatasetScan,
    model_folder: Path,
    settings: ModelSettings,
    plan: CaptionPlan,
    show_progress: bool = True,
    images: Collection[Path] | None = None,
) -> CaptionReport:
    """Caption the scan's training and validation images with the model in ``model_folder`` (loaded only when
    there is something to caption); ``images``: only those of them (the studio's selection), else all."""
    chosen = None if images is None else {Path(path).resolve() for path in images}

    def wanted(path: Path) -> bool:
        return chosen is None or path.resolve() in chosen

    report = CaptionReport(f"{model_folder} (not loaded: nothing to caption)")
    unreadable = [p for p in scan.problems if p.kind in UNREADABLE_KINDS and wanted(p.path)]
    report.failed += [Problem("", p.message) for p in unreadable]  # the message names the file
    journal = None if plan.dry_run or plan.mode == "missing" else _journal(scan, model_folder, settings, plan)
    todo = _todo([target for target in _targets(scan) if wanted(target[0])], plan, journal, report)
    if todo:
        model = open_caption_model(model_folder, settings)
        report.model = model.description
        _caption_batches(model, todo, plan, journal, report, show_progress)
    if journal is not None:
        journal.finish()
    return report


def _caption_batches(
    model: CaptionModel,
    todo: list[tuple[Path, Path]],
    plan: CaptionPlan,
    journal: Journal | None,
    report: CaptionReport,
    show_progress: bool,
) -> None:
    with tqdm(total=len(todo), unit="image", desc="captioning", disable=not show_progress) as progress:
        for start in range(0, len(todo), model.batch_size):
            chunk = todo[start : start + model.batch_size]
            batch = []
            for image_path, caption_path in chunk:
                try:
                    batch.append((image_path, caption_path, load_image_rgb(image_path)))
                except ImageLoadError as error:
                    report.failed += error.problems
            captions = model.caption([image for _, _, image in batch]) if batch else []
            for (image_path, caption_path, _), parts in zip(batch, captions):
                _write(image_path, caption_path, parts, plan, journal, report)
            progress.update(len(chunk))


def _write(
    image: Path, caption_path: Path, parts: list[str], plan: CaptionPlan, journal: Journal | None, report: CaptionReport
) -> None:
    """One image's caption written (or previewed), or the reason it was not."""
    try:
        existing = existing_caption(caption_path) if plan.mode == "append" else ""
    except OSError as error:
        report.failed.append(_unreadable_caption(caption_path, error))
        return
    caption = compose_caption(parts, existing, plan.trigger, plan.always_tags)
    if not caption:
        message = "the model gave no caption for it (a tagger: no tag reached its threshold); lower the threshold"
        report.failed.append(Problem(str(image), f"{message}, or write this caption by hand"))
        return
    if plan.dry_run:
        report.previews.append(f"{caption_path}: {caption}")
        return
    if plan.mode == "append" and caption == existing:
        report.unchanged += 1
    else:
        try:
            write_caption(caption_path, caption)
        except OSError as error:
            report.failed.append(
                Problem(
                    str(caption_path),
                    f"cannot write the caption ({error}); make the file and its folder writable (and check the "
                    "disk has room), then run again: the captions already written are kept",
                )
            )
            return
        report.written += 1
    if journal is not None:
        journal.add(image)


def format_caption_report(report: CaptionReport) -> str:
    """The summary ``dora-studio caption`` prints and the studio shows."""
    lines = [f"model: {report.model}", *report.previews]
    if report.previews:
        lines.append(f"dry run, nothing written: would caption {len(report.previews)} images")
    counts = {
        "captions written": report.written,
        "unchanged (they had every tag)": report.unchanged,
        "already captioned, skipped (--mode overwrite or append redoes them)": report.already_captioned,
        "done by the interrupted run these settings continue": report.resumed,
    }
    lines += [f"{what}: {count}" for what, count in counts.items() if count]
    if not report.previews and not any(counts.values()):
        lines.append("nothing to caption")
    if report.failed:
        lines += [f"failed ({len(report.failed)}):", *(f"  {problem}" for problem in report.failed)]
    return "\n".join(lines)
