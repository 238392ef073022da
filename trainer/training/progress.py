"""Where a run is, and what it tells the outside while it trains.

``Progress`` is what a saved state records (with the seeded data order, all a resume needs); ``StepClock``
times one optimizer step; ``RunReporter`` writes status.json, metrics.jsonl, TensorBoard and Weights & Biases,
draws the progress bar and keeps the ETA. Only the main process writes; the others report nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from trainer.errors import TrainingError
from trainer.optional_packages import import_optional
from trainer.runs.run_directory import RunDirectory

STATUS_INTERVAL_S = 1.0  # status.json is rewritten at most this often between state changes


@dataclass
class Progress:
    """Where the run is: what a saved state records."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs fully done
    batches_done: int = 0  # batches of the current epoch done
    skipped_batches: int = 0  # accumulation groups dropped for a non-finite loss or gradient


class StepClock:
    """Wall time of one optimizer step (its whole accumulation group), and how much of it waited for data."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.started = self.waiting_since = time.perf_counter()
        self.data_wait = 0.0

    def data_arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.waiting_since

    def batch_done(self) -> None:
        self.waiting_since = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class RunReporter:
    """status.json, metrics.jsonl, TensorBoard, Weights & Biases, the progress bar and the ETA of one run."""

    def __init__(self, run: RunDirectory, main_process: bool, show_progress: bool) -> None:
        self.run, self.main_process, self.show_progress = run, main_process, show_progress
        self.tensorboard = None  # a SummaryWriter once open_tensorboard ran
        self.wandb = None  # a wandb Run once open_wandb ran
        self.bar: tqdm | None = None
        self.total_steps = 0
        self._last_status = 0.0
        self._first_step: tuple[float, int] | None = None  # (time, step) when this process began stepping

    def status(self, **fields) -> None:
        """Merge ``fields`` into status.json (``RunDirectory.write_status``)."""
        if self.main_process:
            self.run.write_status(**fields)

    def open_tensorboard(self) -> None:
        """Called before any work, so a missing tensorboard package is said at once."""
        if self.main_process:
            import_optional("tensorboard", feature="saving.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run.tensorboard_dir))

    def open_wandb(self, mode: str, project: str, settings: dict) -> None:
        """Start a Weights & Biases run (``saving.wandb``: "online" or "offline") in the run folder, with the run's
        ``settings`` as its config; called before any work, so a missing package or login is said at once.
        Offline needs no account and no network: ``wandb sync`` uploads the folder later."""
        if not self.main_process:
            return
        wandb = import_optional("wandb", feature="saving.wandb")
        try:
            self.wandb = wandb.init(
                project=project, dir=str(self.run.root), mode=mode, config=settings, name=self.run.root.name
            )
        except wandb.errors.Error as error:
            raise TrainingError.at(
                "saving.wandb",
                f'Weights & Biases did not start ({error}); log in with `wandb login`, or choose "offline" '
                "(no account or network needed; `wandb sync` later)",
            ) from error

    def start_steps(self, total_steps: int, steps_done: int, epochs: int) -> None:
        self.total_steps = total_steps
        self.bar = tqdm(
            total=total_steps,
            initial=steps_done,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.show_progress and self.main_process),
        )
        self.status(state="training", message="training", total_steps=total_steps, epochs=epochs)

    def step_done(self, step: int, epoch: int, loss: float, lrs: dict[str, float], clock: StepClock) -> None:
        """Metrics, progress bar and (at most every STATUS_INTERVAL_S) status of the optimizer step just taken."""
        seconds = clock.seconds()
        if self._first_step is None:
            self._first_step = (time.perf_counter() - seconds, step - 1)
        if self.main_process:
            self.run.append_metrics(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": lrs,
                    "seconds": seconds,
                    "data_seconds": clock.data_wait,
                    "time": time.time(),
                }
            )
        self._log_scalars({"loss": loss} | {f"lr/{name}": lr for name, lr in lrs.items()}, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", refresh=False)
        now = time.perf_counter()
        if now - self._last_status >= STATUS_INTERVAL_S or step == self.total_steps:
            self._last_status = now
            started, first_step = self._first_step
            rate = (step - first_step) / max(now - started, 1e-9)
            self.status(
                state="training",
                step=step,
                epoch=epoch,
                loss=loss,
                eta_seconds=round((self.total_steps - step) / rate, 1),
                message=f"step {step}/{self.total_steps}",
            )

    def validation_done(self, step: int, loss: float) -> None:
        """The held-out images' loss at ``step``: a metrics line of its own, TensorBoard and status."""
        if self.main_process:
            self.run.append_metrics({"step": step, "validation_loss": loss, "time": time.time()})
        self._log_scalars({"loss/validation": loss}, step)
        self.status(validation_loss=loss)

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        """TensorBoard and Weights & Biases, those that are open, under the same names."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
