"""Two or more runs side by side, as people choose between LoRA and DoRA or between two ranks: the settings
that differ, their loss curves on one chart, and their samples of the same prompt at the same point.

Everything is read from the run folders (``config.toml``, ``metrics.jsonl``, ``samples/``); a run whose
settings cannot be read is shown with the reason instead of its settings.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from trainer.runs.run_directory import RunDirectory

from .runs import Sample, loss_curves, read_metrics, read_samples

UNREADABLE = "(unreadable)"


def _flat(settings: dict, prefix: str = "") -> dict[str, str]:
    """``section.key`` -> the value as TOML would show it; nested tables (subsets) by index."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                flat |= _flat(item, f"{name}[{index}].")
        else:
            flat[name] = str(value)
    return flat


def run_settings(run_dir: Path) -> dict[str, str]:
    """The run's resolved settings (its ``config.toml``), flattened; one row naming the problem if unreadable."""
    try:
        return _flat(tomllib.loads(RunDirectory(run_dir).config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:  # tomllib.TOMLDecodeError is a ValueError
        return {"config.toml": f"{UNREADABLE}: {error}"}


def settings_difference(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every setting whose value is not the same in all runs; "" where a run lacks it."""
    settings = [run_settings(run_dir) for run_dir in run_dirs]
    keys = sorted({key for run in settings for key in run})
    rows = [[key, *(run.get(key, "") for run in settings)] for key in keys]
    differing = [row for row in rows if len(set(row[1:])) > 1]
    return ["setting", *(run_dir.name for run_dir in run_dirs)], differing


def loss_curves_of(run_dirs: list[Path]) -> dict[str, list]:
    """Each run's smoothed training loss (and its validation loss), one series per run, for one chart: the Run
    tab's curves (``runs.loss_curves``) without the raw training line, named by run."""
    names = {"training, smoothed": "{run}", "validation": "{run}, validation"}  # in this order, per run
    columns: dict[str, list] = {"step": [], "loss": [], "series": []}
    for run_dir in run_dirs:
        curves = loss_curves(read_metrics(run_dir))
        rows = list(zip(curves["step"], curves["loss"], curves["series"]))
        for series, name in names.items():
            for step, loss, _ in (row for row in rows if row[2] == series):
                columns["step"].append(step)
                columns["loss"].append(loss)
                columns["series"].append(name.format(run=run_dir.name))
    return columns


def sampling_labels(run_dirs: list[Path]) -> list[str]:
    """The samplings (``epoch 3``, ``step 120``, ``base model``) every run has, oldest first in the first run."""
    per_run = [[s.epoch_label for s in sorted(read_samples(run_dir), key=lambda s: s.order)] for run_dir in run_dirs]
    if not per_run:
        return []
    common = set(per_run[0]).intersection(*map(set, per_run[1:]))
    return list(dict.fromkeys(label for label in per_run[0] if label in common))


def side_by_side(run_dirs: list[Path], prompt_index: int, sampling: str) -> list[tuple[Sample, str]]:
    """Each run's sample of one prompt at one sampling, with its run's name, in the runs' order."""
    found = []
    for run_dir in run_dirs:
        match = [s for s in read_samples(run_dir) if s.index == prompt_index and s.epoch_label == sampling]
        found += [(sample, run_dir.name) for sample in match[:1]]
    return found
