"""Start, resume and command trainer processes: the UI's only way to act on a run.

The trainer runs as ``python -m trainer.cli train`` in its own session, writing into its run folder,
so neither a crashed UI nor a closed tab stops it, and a restarted UI finds it again in the folder.
One run trains at a time: starts are serialised by a lock file, and a start while another run is
active is refused with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from trainer.config.schema import TrainConfig
from trainer.config.presets import config_toml
from trainer.runs.run_directory import RunDirectory

from .runs import active_run, run_path, validate_run_name
from trainer.errors import LaunchRefused

PRESET_NAME = "preset.toml"  # what the UI asked for; the trainer writes the resolved config.toml
CONSOLE_NAME = "console.log"  # the trainer process's own output (tracebacks land here)
LOCK_NAME = ".launch.lock"


@contextlib.contextmanager
def _launch_lock(runs_dir: Path) -> Iterator[None]:
    """Across processes: two UIs (or two tabs) pressing Start together start one run."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _refuse_if_busy(runs_dir: Path) -> None:
    running = active_run(runs_dir)
    if running is not None:
        progress = f" (step {running.step}/{running.total_steps})" if running.total_steps else ""
        raise LaunchRefused(f"run {running.name} is still {running.state}{progress}; one run trains at a time: "
                            "stop it first, or wait for it to finish")


def new_run_name(runs_dir: Path, output_name: str) -> str:
    stem = f"{output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, counter = stem, 1
    while (runs_dir / name).exists():
        counter += 1
        name = f"{stem}-{counter}"
    return validate_run_name(name)


def _spawn(run_dir: Path, args: list[str]) -> int:
    """The trainer in a new session (no shared signals or terminal with the UI); returns its pid."""
    console = open(run_dir / CONSOLE_NAME, "ab")  # noqa: SIM115 (the child keeps it; we close our copy below)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", *args, "--run-dir", str(run_dir), "--no-progress"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=run_dir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        console.close()
    # Written before the trainer has even imported torch, so a second Start sees this run as active.
    RunDirectory(run_dir).write_status(state="starting", message="starting the trainer", pid=process.pid)
    return process.pid


def start_run(runs_dir: Path, config: TrainConfig) -> str:
    """Create a run folder for ``config`` and start training it; returns the run's name."""
    runs_dir = Path(runs_dir).resolve()
    with _launch_lock(runs_dir):
        _refuse_if_busy(runs_dir)
        name = new_run_name(runs_dir, config.saving.output_name)
        run_dir = runs_dir / name
        run_dir.mkdir()
        preset = run_dir / PRESET_NAME
        preset.write_text(config_toml(config), encoding="utf-8")
        _spawn(run_dir, [str(preset)])
    return name


def resume_run(runs_dir: Path, name: str) -> str:
    """Continue a stopped, failed or died run from its newest saved state, with its own settings."""
    runs_dir = Path(runs_dir).resolve()
    run_dir = run_path(runs_dir, name)
    with _launch_lock(runs_dir):
        _refuse_if_busy(runs_dir)
        preset = run_dir / PRESET_NAME
        if not preset.is_file() and not (run_dir / "config.toml").is_file():
            raise LaunchRefused(f"run {name} has no settings to resume with (no {PRESET_NAME} or config.toml)")
        # with no saved state yet, --resume auto starts the run over in the same folder
        _spawn(run_dir, ([str(preset)] if preset.is_file() else []) + ["--resume", "auto"])
    return name


def send_command(runs_dir: Path, name: str, command: str) -> None:
    """Ask a running trainer to stop, save or sample after its current step."""
    runs_dir = Path(runs_dir).resolve()
    run_dir = run_path(runs_dir, name)
    running = active_run(runs_dir)
    if running is None or running.name != name:
        raise LaunchRefused(f"run {name} is not running; nothing to {command}")
    RunDirectory(run_dir).send_command(command)
