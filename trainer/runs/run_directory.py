"""The run folder: every path, state, command and name in it, written by the trainer and read by the studio.

Layout: ``config.toml`` (fully resolved settings), ``status.json`` (state, progress, ETA, last message),
``metrics.jsonl`` (one line per optimizer step), ``samples/epoch_NNN/`` and ``samples/step_NNNNNN/`` (``NN.png``
and ``prompts.json``), ``adapters/`` (``NAME-epochNNN``, ``NAME-stepNNNNNN`` and the final ``NAME``, each
``.safetensors``, with its moving average ``...-ema.safetensors`` beside it when ``training.ema_decay`` is set),
``state/``, ``train.log``, ``tensorboard/`` and ``wandb/`` when asked for, and ``commands/``, where anyone may
drop a file named ``stop``, ``save`` or ``sample`` for the trainer to act on at its next step. A run the studio
started also has ``preset.toml`` (what it asked for) and ``console.log`` (the trainer process's own output); a run
analysed with ``dora-studio analyze --run`` has ``analysis/``. Files other processes read are replaced atomically.
This module is the only place these names are spelled.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.errors import RunNameError
from trainer.files import write_bytes_atomically

ACTIVE_STATES = ("starting", "caching", "training", "validating", "sampling", "saving")
FINAL_STATES = ("done", "failed", "stopped")
STATES = (*ACTIVE_STATES, *FINAL_STATES)
COMMANDS = ("stop", "save", "sample")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # run folder names (the browser may send them)
SAMPLES_FOLDER = re.compile(r"(epoch|step)_(\d+)")  # one sampling: after an epoch, or at a step
SAMPLE_IMAGE = re.compile(r"(\d+)\.png")  # the image of sample prompt N
EMA_SUFFIX = "-ema.safetensors"  # the moving average of an adapter, beside it (training.ema_decay)
PROMPTS_FILE = "prompts.json"  # beside the images: every value each prompt was drawn with
AdapterKind = Literal["epoch", "step", "final"]


def validate_run_name(name: str) -> str:
    """``name`` if it is a plain folder name that cannot leave the runs folder, else ``RunNameError``."""
    # fullmatch, not match with "$": "$" would accept a trailing newline.
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise RunNameError(
            f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 100 characters)"
        )
    return name


def new_run_name(runs_dir: Path, output_name: str) -> str:
    """``<output_name>-<date>-<time>``, with ``-2``, ``-3``... when that folder exists already."""
    stem = f"{output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, counter = stem, 1
    while (Path(runs_dir) / name).exists():
        counter += 1
        name = f"{stem}-{counter}"
    return validate_run_name(name)


def sample_image_name(index: int) -> str:
    return f"{index:02d}.png"


@dataclass(frozen=True)
class RunDirectory:
    root: Path

    @classmethod
    def named(cls, runs_dir: Path, name: str) -> RunDirectory:
        """The run ``name`` in ``runs_dir``, resolved; refused if it (through a symlink) lies outside ``runs_dir``."""
        parent = Path(runs_dir).resolve()
        root = (parent / validate_run_name(name)).resolve()
        if root == parent or not root.is_relative_to(parent):
            raise RunNameError(f"run {name!r} points outside {parent}")
        return cls(root)

    @classmethod
    def of_state(cls, state_dir: Path) -> RunDirectory:
        """The run a saved state (``<run>/state/step-N``) belongs to."""
        return cls(Path(state_dir).resolve().parent.parent)

    # -- files -------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def preset_path(self) -> Path:
        return self.root / "preset.toml"

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
    def console_log_path(self) -> Path:
        return self.root / "console.log"

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

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_dir(self) -> Path:
        """What Weights & Biases writes when given the run's folder (``wandb.init(dir=root)``): its offline runs."""
        return self.root / "wandb"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def exports_dir(self) -> Path:
        """Files the studio made from the run's adapters (resized, converted): apart, so they are no checkpoints."""
        return self.root / "exports"

    def is_run(self) -> bool:
        """Whether the folder holds a run (one being started, running, or done)."""
        return any(path.is_file() for path in (self.status_path, self.config_path, self.preset_path))

    def epoch_samples_dir(self, epoch: int) -> Path:
        """Samples after ``epoch`` epochs; ``epoch_000`` is the base model, before training."""
        return self.samples_dir / f"epoch_{epoch:03d}"

    def step_samples_dir(self, step: int) -> Path:
        return self.samples_dir / f"step_{step:06d}"

    def adapter_path(self, output_name: str, kind: AdapterKind, *, epoch: int = 0, step: int = 0) -> Path:
        suffix = {"final": "", "epoch": f"-epoch{epoch:03d}", "step": f"-step{step:06d}"}[kind]
        return self.adapters_dir / f"{output_name}{suffix}.safetensors"

    @staticmethod
    def ema_twin(adapter: Path) -> Path:
        """Where the moving average of ``adapter`` is saved: ``NAME-ema.safetensors`` beside ``NAME.safetensors``."""
        return adapter.with_name(adapter.name.removesuffix(".safetensors") + EMA_SUFFIX)

    def intermediate_adapters(self, output_name: str) -> list[Path]:
        """The epoch and step adapters of ``output_name`` (not the final one, nor any moving average), oldest first."""
        found = self.adapters_dir.glob(f"{output_name}-*.safetensors")
        return sorted(
            (path for path in found if not path.name.endswith(EMA_SUFFIX)), key=lambda path: path.stat().st_mtime
        )

    def saved_adapters(self, output_name: str) -> list[Path]:
        """Every adapter of ``output_name`` the run saved, as checkpoints: epoch and step files, then the final one."""
        final = self.adapter_path(output_name, "final")
        return self.intermediate_adapters(output_name) + ([final] if final.is_file() else [])

    def prune_adapters(self, output_name: str, keep_last: int) -> None:
        """Delete all but the newest ``keep_last`` intermediate adapters (``<= 0`` keeps all), each with its
        moving average."""
        for old in self.intermediate_adapters(output_name)[:-keep_last] if keep_last > 0 else []:
            old.unlink(missing_ok=True)
            self.ema_twin(old).unlink(missing_ok=True)

    def newest_sample(self, prompt_index: int) -> Path | None:
        """The newest image of sample prompt ``prompt_index`` drawn with the adapter, or None when there is none
        yet; the base model's, drawn before training (``epoch_000``), shows no adapter and is never one."""
        found = [
            (image.stat().st_mtime_ns, image)
            for folder in self.samples_dir.glob("*_*")
            if SAMPLES_FOLDER.fullmatch(folder.name)
            and folder != self.epoch_samples_dir(0)
            and (image := folder / sample_image_name(prompt_index)).is_file()
        ]
        return max(found)[1] if found else None

    @staticmethod
    def verify_result_path(adapter: Path) -> Path:
        """Where the studio keeps ``dora-studio verify``'s result for an adapter: ``NAME.verify.json`` beside it."""
        return adapter.with_name(adapter.name.removesuffix(".safetensors") + ".verify.json")

    # -- what the trainer writes -------------------------------------------------------------------

    def create(self) -> None:
        for folder in (self.root, self.samples_dir, self.adapters_dir, self.states_dir, self.commands_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def remove_stale_temp_files(self) -> list[Path]:
        """Temp files a killed trainer left mid-write (``.NAME.<hex>.tmp``); only the trainer writes here."""
        stale = [
            p
            for folder in (self.root, self.adapters_dir, self.samples_dir)
            for p in folder.rglob(".*.tmp")
            if p.is_file()
        ]
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
