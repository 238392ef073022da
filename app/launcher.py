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
from collections.abc import Iterator
from pathlib import Path

from trainer.config.presets import config_toml
from trainer.config.schema import TrainConfig
from trainer.errors import LaunchRefused
from trainer.runs.run_directory import RunDirectory, new_run_name

from .runs import active_run

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
        raise LaunchRefused(
            f"run {running.name} is still {running.state}{progress}; one run trains at a time: "
            "stop it first, or wait for it to finish"
        )


def _spawn(run: RunDirectory, args: list[str]) -> int:
    """The trainer in a new session (no shared signals or terminal with the UI); returns its pid.

    Its own output (a traceback, a crash at start-up) goes to the run's console.log.
    """
    console = open(run.console_log_path, "ab")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", *args, "--run-dir", str(run.root), "--no-progress"],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run.root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        console.close()
    # Written before the trainer has even imported torch, so a second Start sees this run as active.
    run.write_status(state="starting", message="starting the trainer", pid=process.pid)
    return process.pid


def start_run(runs_dir: Path, config: TrainConfig) -> str:
    """Create a run folder for ``config`` and start training it; returns the run's name."""
    runs_dir = Path(runs_dir).resolve()
    with _launch_lock(runs_dir):
        _refuse_if_busy(runs_dir)
        name = new_run_name(runs_dir, config.saving.output_name)
        run = RunDirectory(runs_dir / name)
        run.root.mkdir()
        run.preset_path.write_text(config_toml(config), encoding="utf-8")  # the trainer writes config.toml
        _spawn(run, [str(run.preset_path)])
    return name


def resume_run(runs_dir: Path, name: str) -> str:
    """Continue a stopped, failed or died run from its newest saved state, with its own settings."""
    runs_dir = Path(runs_dir).resolve()
    run = RunDirectory.named(runs_dir, name)
    with _launch_lock(runs_dir):
        _refuse_if_busy(runs_dir)
        preset = run.preset_path
        if not preset.is_file() and not run.config_path.is_file():
            raise LaunchRefused(
                f"run {name} has no settings to resume with (no {preset.name} or {run.config_path.name})"
            )
        # with no saved state yet, --resume auto starts the run over in the same folder
        _spawn(run, ([str(preset)] if preset.is_file() else []) + ["--resume", "auto"])
    return name


def send_command(runs_dir: Path, name: str, command: str) -> None:
    """Ask a running trainer to stop, save or sample after its current step."""
    runs_dir = Path(runs_dir).resolve()
    run = RunDirectory.named(runs_dir, name)
    running = active_run(runs_dir)
    if running is None or running.name != name:
        raise LaunchRefused(f"run {name} is not running; nothing to {command}")
    run.send_command(command)
