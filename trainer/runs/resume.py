"""Which saved state a resume starts from, and whether the settings still describe the same training.

A resume replays the data order and noise from the seed, so it only continues the same run if every
setting that shapes the training is unchanged; the ones listed in ``RESUME_MAY_CHANGE`` may differ
(more epochs, other sample prompts, another save cadence).
"""

from __future__ import annotations

from pathlib import Path

from trainer.errors import TrainStateError

from .run_directory import RunDirectory
from .train_state import list_states, newest_state

RESUME_MAY_CHANGE = (
    "sampling.",
    "saving.",
    "training.epochs",
    "training.max_steps",
    "dataset.latent_cache_dir",
    "dataset.cache_latents",
    "dataset.cache_text_encoder_outputs",
    "dataset.loader_workers",
    "training.process_timeout_minutes",
)


def find_state(resume: str, run: RunDirectory) -> Path | None:
    """``auto``: the run's newest complete state, or None when it saved none yet (the run then starts over,
    which is what an interrupted run that never reached a save needs); otherwise a state folder."""
    if resume == "auto":
        return newest_state(run.states_dir)
    path = Path(resume)
    if path in list_states(path.parent):
        return path
    raise TrainStateError.at(
        path,
        "not a complete saved state (a folder like <run>/state/step-00000120 holding "
        "state.json and tensors.safetensors); use --resume auto to take the newest",
    )


def _flatten(settings: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in settings.items() for key, value in values.items()}


def check_resume_config(saved: dict, current: dict, state_dir: Path) -> None:
    """Refuse a resume whose training-relevant settings differ from the saved run's, naming each."""
    before, after = _flatten(saved), _flatten(current)
    changed = sorted(
        key
        for key in before.keys() | after.keys()
        if before.get(key) != after.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    )
    if changed:
        details = "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed)
        raise TrainStateError.at(
            state_dir,
            f"cannot resume with different training settings ({details}). Set them "
            "back, or start a new run without --resume",
        )


def check_resume_processes(saved: int, current: int, state_dir: Path) -> None:
    """The data order and the global batch depend on the number of processes, so it must not change."""
    if saved != current:
        raise TrainStateError.at(
            state_dir,
            f"saved by a run with {saved} training process(es), resumed with "
            f"{current}; resume with {saved} (training.processes, or your accelerate/torchrun "
            "launch), or start a new run",
        )
