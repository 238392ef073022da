"""Reading run folders for the UI: what a run is doing, its curves, samples, adapters and logs.

The run directory (``trainer.runs.run_directory``) is the whole contract between trainer and UI, and the UI
reads it while the trainer writes it, or after the trainer died. So every reader here tolerates
missing and half-written files and never raises on them: a poll that fails would blank the page.
Names come from the browser, so they are checked before they touch the filesystem.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import Problem, RunNameError
from trainer.runs.run_directory import (
    ACTIVE_STATES,
    PROMPTS_FILE,
    SAMPLE_IMAGE,
    SAMPLES_FOLDER,
    STATES,
    RunDirectory,
)

STARTING_GRACE_S = 60.0  # a folder without status.json this young is a trainer still starting up
LOG_READ_LIMIT = 1 << 20  # bytes read from the end of a log: enough lines, however big the file


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    # pid <= 0 would address process groups; bool is an int but never a pid.
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # it exists, owned by someone else
    except (OSError, OverflowError):  # ProcessLookupError: no such process
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """An exited child its parent (maybe this UI) has not reaped yet still answers signal 0 (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


@dataclass
class RunStatus:
    name: str
    state: str  # a trainer state, or "died" (active but its process is gone) or "unknown"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    eta_seconds: float | None = None
    loss: float | None = None
    message: str = ""
    problems: list[Problem] = field(default_factory=list)  # a failed run's, each naming a setting or file
    last_adapter: str = ""
    updated_at: float | None = None  # status.json's, else the folder's mtime: when the run last changed
    pid: int | None = None
    alive: bool = False


def _number(value, kind, default):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return kind(value)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _problems(value) -> list[Problem]:
    if not isinstance(value, list):
        return []
    return [Problem(str(p.get("where") or ""), str(p.get("message") or "")) for p in value if isinstance(p, dict)]


def read_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    try:
        folder_mtime = run_dir.stat().st_mtime
    except OSError:
        folder_mtime = None
    status = _read_json(RunDirectory(run_dir).status_path)
    if not isinstance(status, dict) or status.get("state") not in STATES:
        young = folder_mtime is not None and time.time() - folder_mtime < STARTING_GRACE_S
        return RunStatus(
            run_dir.name,
            "starting" if young else "unknown",
            updated_at=folder_mtime,
            message="waiting for the trainer to start" if young else "no readable status.json",
        )
    pid = _number(status.get("pid"), int, None)
    run = RunStatus(
        name=run_dir.name,
        state=status["state"],
        pid=pid,
        alive=pid_alive(pid),
        step=_number(status.get("step"), int, 0),
        total_steps=_number(status.get("total_steps"), int, 0),
        epoch=_number(status.get("epoch"), int, 0),
        epochs=_number(status.get("epochs"), int, 0),
        eta_seconds=_number(status.get("eta_seconds"), float, None),
        loss=_number(status.get("loss"), float, None),
        message=str(status.get("message") or ""),
        problems=_problems(status.get("problems")),
        last_adapter=str(status.get("last_adapter") or ""),
        updated_at=_number(status.get("updated_at"), float, folder_mtime),
    )
    if run.state in ACTIVE_STATES and not run.alive:
        # Killed (OOM, SIGKILL, a closed terminal) before it could write "failed" or "stopped".
        run.message = (
            f"the trainer (pid {pid}) is gone while {run.state} at step {run.step}, without saying why; "
            "see the log. Continue from its last saved state with the UI's Resume or "
            f"`dora-studio train --run-dir {shlex.quote(str(run_dir))} --resume auto`"
        )
        run.state, run.eta_seconds = "died", None
    return run


def read_metrics(run_dir: Path, after_step: int = 0) -> list[dict]:
    """Whole records for steps after ``after_step``; a torn last line (a write in progress) is skipped."""
    try:
        text = RunDirectory(Path(run_dir)).metrics_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _number(record.get("step"), int, 0) > after_step:
            records.append(record)
    return records


def kept_or(chosen: str | None, choices: list[str], preferred: str = "") -> str | None:
    """A dropdown's value: the user's choice while it is still offered; else ``preferred`` if offered; else the
    first choice; else None."""
    if chosen in choices:
        return chosen
    if preferred in choices:
        return preferred
    return choices[0] if choices else None


LOSS_SMOOTHING = 0.9  # TensorBoard's default weight for its smoothed line


def smoothed(values: list[float], weight: float = LOSS_SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled
    toward zero (the average starts empty, not at 0)."""
    average, out = 0.0, []
    for count, value in enumerate(values, start=1):
        average = average * weight + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def loss_curves(metrics: list[dict]) -> dict[str, list]:
    """Columns for one plot: the training loss per step, its smoothed line, and the validation loss where
    it was measured."""
    rows = [
        (record["step"], value, series)
        for record in metrics
        for key, series in (("loss", "training"), ("validation_loss", "validation"))
        if isinstance(value := record.get(key), (int, float))
    ]
    training = [(step, value) for step, value, series in rows if series == "training"]
    rows += [
        (step, value, "training, smoothed") for (step, _), value in zip(training, smoothed([v for _, v in training]))
    ]
    return {"step": [r[0] for r in rows], "loss": [r[1] for r in rows], "series": [r[2] for r in rows]}


@dataclass
class Sample:
    path: Path
    epoch_label: str  # "epoch 3", "step 120", or "base model" for the before-training epoch_000
    order: int  # larger is newer; the same for every image of one sampling
    index: int  # which sample prompt
    prompt: str


def _listdir(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder)]
    except OSError:
        return []


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _sample_dirs(run_dir: Path) -> list[tuple[Path, str]]:
    """(folder, label) oldest first: by when written, as epoch and step folders can interleave."""
    found = []
    for folder in _listdir(RunDirectory(Path(run_dir)).samples_dir):
        match, stat = SAMPLES_FOLDER.fullmatch(folder.name), _stat(folder)
        if match and stat and folder.is_dir():
            kind, number = match[1], int(match[2])
            label = "base model" if (kind, number) == ("epoch", 0) else f"{kind} {number}"
            # The base model is drawn before any training, whatever a copy did to the mtimes.
            found.append(((label != "base model", stat[0], kind == "step", number), folder, label))
    return [(folder, label) for _, folder, label in sorted(found)]


def read_samples(run_dir: Path) -> list[Sample]:
    """Every sample image, newest sampling first, then by prompt index."""
    samples = []
    for order, (folder, label) in enumerate(_sample_dirs(run_dir)):
        records = _read_json(folder / PROMPTS_FILE)  # written after the images: may be missing yet
        records = records if isinstance(records, list) else []
        prompts = {r.get("file"): str(r.get("prompt", "")) for r in records if isinstance(r, dict)}
        for path in _listdir(folder):
            match = SAMPLE_IMAGE.fullmatch(path.name)  # also skips ".00.png.<hex>.tmp" files being written
            if match:
                samples.append(Sample(path, label, order, int(match[1]), prompts.get(path.name, "")))
    samples.sort(key=lambda s: (-s.order, s.index))
    return samples


GRID_COLUMNS = 8  # samplings shown side by side; older ones are in the compare view


def sample_grid(samples: list[Sample], max_columns: int = GRID_COLUMNS) -> tuple[list[Sample], int]:
    """The README's grid: one row per prompt, one column per sampling, oldest at the left and the newest at
    the right (the last ``max_columns`` samplings), in reading order, with its column count for the gallery."""
    orders = sorted({s.order for s in samples})[-max_columns:]
    shown = sorted((s for s in samples if s.order in orders), key=lambda s: (s.index, s.order))
    return shown, max(len(orders), 1)


def prompt_choices(samples: list[Sample]) -> list[tuple[str, str]]:
    """A prompt picker's entries: ``index: prompt`` (cut at 60 characters) and the index, by index."""
    prompts = sorted({(s.index, s.prompt) for s in samples})
    return [(f"{index}: {prompt[:60]}", str(index)) for index, prompt in prompts]


def samples_for_prompt(samples: list[Sample], index: int) -> list[Sample]:
    """One prompt across the run, oldest first: how the adapter changed the same picture."""
    return sorted((s for s in samples if s.index == index), key=lambda s: s.order)


def read_adapters(run_dir: Path) -> list[Path]:
    """Saved adapters, newest first; temp files of a save in progress (".name.tmp") are left out."""
    found = []
    for path in RunDirectory(Path(run_dir)).adapters_dir.glob("*.safetensors"):
        try:
            if not path.name.startswith(".") and path.is_file():
                found.append((path.stat().st_mtime_ns, path.name, path))
        except OSError:
            continue  # pruned while we looked
    return [path for *_, path in sorted(found, reverse=True)]


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines, reading at most LOG_READ_LIMIT bytes from the end of the file."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - LOG_READ_LIMIT))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    rows = text.split("\n")
    if size > LOG_READ_LIMIT:
        rows = rows[1:]  # the first row was cut by the seek
    if rows and rows[-1] == "":
        rows.pop()
    rows = rows[-lines:] if lines > 0 else []
    # A progress bar redraws one line with "\r": show what a terminal would, its last state.
    return "\n".join(row.rsplit("\r", 1)[-1] for row in rows)


def log_tail(run_dir: Path, lines: int = 40) -> str:
    """train.log's tail; console.log's too when the run failed or died, or never got to train.log,
    since a traceback or a crash at start-up only reaches the process's stderr."""
    run = RunDirectory(Path(run_dir))
    text = _tail(run.log_path, lines)
    if read_status(run.root).state in ("failed", "died", "unknown") or not text:
        console = _tail(run.console_log_path, lines)
        if console:
            text = f"{text}\n\n--- console.log ---\n{console}" if text else console
    return text


def run_label(status: RunStatus, runs_dir: Path) -> str:
    """How the run picker names a run: its name, its adapter's kind and rank, and when it last changed. The
    kind and rank come from the settings the studio started it with (``preset.toml``), else the trainer's
    ``config.toml``, and are left out when neither can be read. Its state is not in the label, which is drawn
    when the list is: the status under the picker says it as it changes."""
    parts = [status.name]
    run = RunDirectory(Path(runs_dir) / status.name)
    for settings in (run.preset_path, run.config_path):
        try:
            network = tomllib.loads(settings.read_text(encoding="utf-8"))["network"]
            parts.append(f"{network['kind']} r{network['rank']}")
            break
        except (OSError, ValueError, KeyError, TypeError):  # tomllib.TOMLDecodeError is a ValueError
            continue
    if status.updated_at is not None:
        parts.append(time.strftime("%Y-%m-%d %H:%M", time.localtime(status.updated_at)))
    return " · ".join(parts)


def list_runs(runs_dir: Path) -> list[RunStatus]:
    """Every run folder (``RunDirectory.is_run``), most recently updated first."""
    runs = []
    for entry in _listdir(Path(runs_dir)):
        if entry.is_symlink():
            continue  # an alias of a run would be listed twice; one pointing out is not ours
        try:
            run = RunDirectory.named(runs_dir, entry.name)  # drops hidden folders and invalid names
        except RunNameError:
            continue
        if run.root.is_dir() and run.is_run():
            runs.append(read_status(run.root))
    runs.sort(key=lambda run: (run.updated_at or 0.0, run.name), reverse=True)
    return runs


def active_run(runs_dir: Path) -> RunStatus | None:
    """The newest run whose trainer is at work, if any (read_status already turned dead ones into "died")."""
    return next((run for run in list_runs(runs_dir) if run.state in ACTIVE_STATES and run.alive), None)


def signature(run_dir: Path) -> tuple:
    """A cheap fingerprint of what the UI shows: equal between two polls means nothing to redraw.

    It includes the derived state because a killed trainer changes no file, yet the run turns "died".
    """
    run = RunDirectory(Path(run_dir))
    status, metrics = _stat(run.status_path), _stat(run.metrics_path)
    sample_files = sum(
        not path.name.startswith(".") for folder, _ in _sample_dirs(run.root) for path in _listdir(folder)
    )
    adapters = tuple((p.name, *(_stat(p) or ())) for p in read_adapters(run.root))
    logs = tuple(_stat(p) for p in (run.log_path, run.console_log_path))
    return (status and status[0], metrics and metrics[1], sample_files, adapters, logs, read_status(run.root).state)


def format_eta(seconds: float | None) -> str:
    """ "45 s", "3 min 20 s", "1 h 05 min"; "" when there is nothing sensible to say."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    minutes = round(total / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"
