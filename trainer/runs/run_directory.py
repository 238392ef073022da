"""The run directory: everything a run shows the outside world, and the only door the UI has into it.

Layout: ``config.toml`` (fully resolved settings), ``status.json`` (state, progress, ETA, last message),
``metrics.jsonl`` (one line per optimizer step), ``samples/epoch_NNN/``, ``adapters/``, ``state/``,
``train.log``, and ``commands/``, where anyone may drop a file named ``stop``, ``save`` or ``sample``
for the trainer to act on at its next step. Files other processes read are replaced atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.files import write_bytes_atomically

STATES = ("starting", "caching", "training", "sampling", "saving", "done", "failed", "stopped")
COMMANDS = ("stop", "save", "sample")


@dataclass(frozen=True)
class RunDirectory:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "train.log"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def states_dir(self) -> Path:
        return self.root / "state"

    @property
    def commands_dir(self) -> Path:
        return self.root / "commands"

    def create(self) -> None:
        for folder in (self.root, self.samples_dir, self.adapters_dir, self.states_dir, self.commands_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def remove_stale_temp_files(self) -> list[Path]:
        """Temp files a killed trainer left mid-write (``.NAME.<hex>.tmp``); only the trainer writes here."""
        stale = [p for folder in (self.root, self.adapters_dir, self.samples_dir)
                 for p in folder.rglob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into status.json (atomically) and return the new status."""
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        # pid: the writer's, unless given (the UI records the trainer it spawned before the trainer can)
        status = {**self.read_status(), "pid": os.getpid(), **fields, "updated_at": time.time()}
        write_bytes_atomically(self.status_path, [json.dumps(status, indent=1).encode()])
        return status

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line, flushed at once, so a reader polling the file sees whole steps only."""
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines for steps after ``after_step`` (and any torn last line), before a resume appends again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= after_step:
                kept.append(line + "\n")
        write_bytes_atomically(self.metrics_path, [line.encode() for line in kept])

    def take_commands(self) -> set[str]:
        """Commands waiting in ``commands/``, each removed as it is taken; unknown files are left alone."""
        taken = set()
        for name in COMMANDS:
            path = self.commands_dir / name
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            taken.add(name)
        return taken

    def send_command(self, name: str) -> None:
        if name not in COMMANDS:
            raise ValueError(f"unknown command {name!r}; one of {', '.join(COMMANDS)}")
        write_bytes_atomically(self.commands_dir / name, [b""])
