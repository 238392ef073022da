"""The training loop: for each step, noise a latent, ask the UNet for the noise, step the adapter.

Set-up is in ``training.setup``, a step's arithmetic in ``training.step``, data in ``data.epoch_plan`` and
``data.batches``, what several processes share in ``training.processes``, status, metrics and the progress
bar in ``training.progress``, stop signals in ``training.signals``; saving, sampling, commands and resuming
are named helpers below, so the loop in ``_train_epoch`` reads as plainly as nanoGPT's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.config.parsing import to_dict
from trainer.config.presets import write_config
from trainer.config.schema import TrainConfig
from trainer.data.batches import EpochBatches, batch_loader
from trainer.data.epoch_plan import plan_epoch, shard_batch
from trainer.errors import StudioError, TrainingError
from trainer.runs.resume import check_resume_config, check_resume_processes, find_state
from trainer.runs.run_directory import RunDirectory
from trainer.runs.train_state import (
    load_train_state,
    prune_states,
    read_state_extra,
    save_train_state,
)

from .bad_steps import finite_step
from .ema import AdapterEMA
from .placement import on_device
from .processes import (
    agree_on_commands,
    average_gradients,
    make_accelerator,
    sum_over_processes,
)
from .progress import Progress, RunReporter, StepClock
from .sampling import SampleDefaults, generate_samples
from .saving import save_network
from .setup import Session, prepare_session
from .signals import StopRequested, StopSignals
from .step import draw_step_noise, latent_shape, step_seed, training_loss
from .validation import Validation

log = logging.getLogger("dora_studio")


class Trainer:
    """One run in one run directory: owns the session, the progress and the bookkeeping."""

    def __init__(self, config: TrainConfig, run: RunDirectory, show_progress: bool = True):
        self.config, self.run, self.show_progress = config, run, show_progress
        self.signals = StopSignals()
        self.progress = Progress()
        self.started_at = time.time()
        # Made when the run starts: the accelerator sets up the process group, the reporter needs to know
        # whether this is the main process, the session holds data, models, adapters and optimizer.
        self.accelerator: Accelerator | None = None
        self.report: RunReporter | None = None
        self.session: Session | None = None
        self.validation: Validation | None = None
        self.ema: AdapterEMA | None = None  # the adapter's moving average, when training.ema_decay asks for one

    # -- entry point -------------------------------------------------------------------------------

    def run_training(self, resume: str | None = None) -> Path:
        """Train to the end (or a stop request); returns the newest adapter written."""
        self.accelerator = accelerator = make_accelerator(self.config)
        self.report = RunReporter(self.run, accelerator.is_main_process, self.show_progress)
        if accelerator.is_main_process:
            self.run.create()
            self.run.remove_stale_temp_files()
            write_config(self.config, self.run.config_path)
        self.report.status(
            state="starting",
            message="loading data and models",
            started_at=self.started_at,
            processes=accelerator.num_processes,
        )
        with self.signals.installed():
            try:
                return self._run(accelerator, resume)
            except StopRequested:
                if accelerator.is_main_process and self.run.read_status().get("state") != "stopped":
                    self.report.status(state="stopped", message="stopped before training began")
                raise
            except BaseException as error:
                with contextlib.suppress(OSError):  # a full disk must not hide the reason behind a second error
                    problems = error.problems if isinstance(error, StudioError) else []
                    self.report.status(
                        state="failed",
                        message=str(error) or type(error).__name__,
                        error_type=type(error).__name__,
                        problems=[asdict(p) for p in problems],
                    )
                raise

    def _run(self, accelerator: Accelerator, resume: str | None) -> Path:
        if accelerator.device.type == "cpu" and self.config.training.mixed_precision == "fp16":
            raise TrainingError.at(
                "training.mixed_precision",
                '"fp16" needs a GPU (CPUs have no fp16 autocast); use "bf16" or "no" on this machine',
            )
        if self.config.saving.tensorboard:
            self.report.open_tensorboard()  # a missing package is said before any work
        if self.config.saving.wandb != "off":
            self.report.open_wandb(self.config.saving.wandb, self.config.saving.wandb_project, to_dict(self.config))
        self.report.status(state="caching", message="checking the dataset and caching latents")
        with accelerator.main_process_first():  # rank 0 builds/caches first; the others then find it all made
            self.session = session = prepare_session(
                self.config, accelerator.device, accelerator.num_processes, on_caching=self._caching_progress
            )
        log.info(
            "%d images, %d batches per epoch, %d optimizer steps in all",
            len(session.examples),
            session.batches_per_epoch,
            session.total_steps,
        )
        # Only the optimizer is prepared (fp16 loss scaling). The models are not wrapped in DDP: gradients
        # of the adapters are averaged by hand (processes.average_gradients), which covers the text encoders too and
        # layers skipped by module dropout, and leaves the pipeline's own modules unwrapped for sampling.
        session.optimizer = accelerator.prepare(session.optimizer)
        self.ema = AdapterEMA.of_run(session.trainable, self.config.training)
        resumed = self._resume(resume) if resume else False
        if not resumed and self.config.sampling.at_start and session.sample_prompts:
            self._sample(self.run.epoch_samples_dir(0), adapters=False)
        if accelerator.is_main_process:
            self.run.truncate_metrics(self.progress.step)
        self.validation = Validation(session, accelerator, self.config.validation.seed)
        if not resumed:
            self._validate()  # the starting point of the curve
        adapter = self._train_steps()
        self.report.status(
            state="done",
            message=f"finished: {adapter}",
            last_adapter=str(adapter),
            step=self.progress.step,
            eta_seconds=0,
        )
        return adapter

    # -- the loop ----------------------------------------------------------------------------------

    def _train_steps(self) -> Path:
        """Epoch after epoch until the run's last optimizer step; then the final adapter."""
        self.report.start_steps(self.session.total_steps, self.progress.step, self.config.training.epochs)
        while self.progress.epoch < self.config.training.epochs and self.progress.step < self.session.total_steps:
            if not self._train_epoch():  # max_steps came inside the epoch
                self._sample(self.run.step_samples_dir(self.progress.step))  # the last look at the run
                if not self.config.validation.every_n_steps:
                    self._validate()
                break
            self.progress.epoch, self.progress.batches_done = self.progress.epoch + 1, 0
            self._epoch_bookkeeping()
        self.report.close()
        return self._save("final")

    def _train_epoch(self) -> bool:
        """The rest of the current epoch; False when the run's last step came before the epoch's end."""
        session, config, accelerator = self.session, self.config, self.accelerator
        epoch, processes = self.progress.epoch, accelerator.num_processes
        accumulation = config.training.gradient_accumulation
        global_batches = plan_epoch(
            session.examples, session.augment, config.training.batch_size * processes, config.training.seed, epoch
        )
        shards = [shard_batch(batch, accelerator.process_index, processes) for batch in global_batches]
        batches = batch_loader(
            EpochBatches(
                [shard.images for shard in shards], session.examples, session.latent_cache, session.augment.background
            ),
            self.progress.batches_done,
            config.dataset.loader_workers,
        )
        clock, group_loss = StepClock(), 0.0
        for index, batch in enumerate(batches, start=self.progress.batches_done):
            clock.data_arrived()
            shard = shards[index]
            group_start = index - index % accumulation
            group_size = min(accumulation, len(shards) - group_start)

            # forward and backward on this process's share of the global batch
            torch.manual_seed(step_seed(config.training.seed, epoch * len(shards) + index))
            step_noise = draw_step_noise(
                shard.global_count,
                latent_shape(session, batch),
                session.noise_scheduler.config.num_train_timesteps,
                config.training,
                session.device,
            )
            losses = training_loss(
                session,
                session.pipe.unet,
                batch,
                step_noise.rows(shard.offset, len(shard.images)),
                accelerator.autocast,
            )
            weights = batch.loss_weights * torch.tensor(shard.weights)  # prior_loss_weight; 0 for a stand-in
            weighted = (losses * weights.to(losses.device)).sum()
            # each process's share of the global mean; averaging over processes (and the group) gives
            # exactly the loss one process would compute on the whole global batch
            accelerator.backward(weighted * processes / shard.global_count / group_size)
            group_loss += weighted.item() / shard.global_count / group_size

            # an optimizer step after the accumulation group's last batch
            if index == group_start + group_size - 1:
                group_loss = sum_over_processes(accelerator, group_loss)
                average_gradients(accelerator, session.trainable.values())
                if finite_step(accelerator, session.trainable.values(), group_loss, config, self.progress):
                    session.optimizer.step()
                    session.lr_scheduler.step()
                    session.optimizer.zero_grad(set_to_none=True)
                    self.progress.step += 1
                    self.progress.batches_done = index + 1
                    if self.ema is not None:
                        self.ema.update(self.progress.step)
                    self._after_step(group_loss, clock)
                    self._step_bookkeeping()
                else:  # a bad group, skipped as training.max_skipped_batches allows
                    session.optimizer.zero_grad(set_to_none=True)
                    self.progress.batches_done = index + 1
                group_loss = 0.0
                clock.restart()  # saving and sampling are not step time
                if self.progress.step >= session.total_steps and index + 1 < len(shards):
                    return False
            clock.batch_done()
        return True

    # -- bookkeeping -------------------------------------------------------------------------------

    def _after_step(self, loss: float, clock: StepClock) -> None:
        """Report the step just taken, with each part's learning rate (the no-decay twins left out)."""
        lrs = {
            group.get("name", str(i)): group["lr"]
            for i, group in enumerate(self.session.optimizer.param_groups)
            if not str(group.get("name", "")).endswith("/no_decay")
        }
        self.report.step_done(self.progress.step, self.progress.epoch + 1, loss, lrs, clock)

    def _step_bookkeeping(self) -> None:
        """Commands, signals and every-N-steps saving/sampling, after an optimizer step."""
        local = self.run.take_commands() if self.accelerator.is_main_process else set()
        commands = agree_on_commands(self.accelerator, local | ({"stop"} if self.signals.stop else set()))
        step, saving, sampling = self.progress.step, self.config.saving, self.config.sampling
        every = self.config.validation.every_n_steps
        if every and step % every == 0:
            self._validate()
        if "sample" in commands or (sampling.every_n_steps and step % sampling.every_n_steps == 0):
            self._sample(self.run.step_samples_dir(step))
        if "stop" in commands:
            path = self._save("step")
            self.report.status(
                state="stopped",
                step=step,
                last_adapter=str(path),
                message=f"stopped at step {step}; saved {path.name}; resume with --resume auto",
            )
            raise StopRequested
        if step < self.session.total_steps and (
            "save" in commands or (saving.every_n_steps and step % saving.every_n_steps == 0)
        ):
            self._save("step")

    def _epoch_bookkeeping(self) -> None:
        epoch, saving, sampling = self.progress.epoch, self.config.saving, self.config.sampling
        if not self.config.validation.every_n_steps:
            self._validate()
        if sampling.every_n_epochs and epoch % sampling.every_n_epochs == 0:
            self._sample(self.run.epoch_samples_dir(epoch))
        last = epoch == self.config.training.epochs or self.progress.step >= self.session.total_steps
        if not last and saving.every_n_epochs and epoch % saving.every_n_epochs == 0:
            self._save("epoch")

    def _validate(self) -> None:
        """Measure the held-out images' loss now (every process takes part), when there are any."""
        if self.validation:
            self.report.status(state="validating", message="measuring the validation loss")
            loss = self.validation.loss()
            log.info("validation loss at step %d: %.5f", self.progress.step, loss)
            self.report.validation_done(self.progress.step, loss)
            self.report.status(state="training", message="training")

    def _sample(self, out_dir: Path, adapters: bool = True) -> None:
        session = self.session
        if not session.sample_prompts or not self.accelerator.is_main_process:
            return
        self.report.status(state="sampling", message=f"sampling {out_dir.name}")
        resolution = self.config.dataset.resolution
        defaults = SampleDefaults(
            resolution,
            resolution,
            self.config.sampling.steps,
            self.config.sampling.guidance_scale,
            self.config.sampling.seed,
        )
        layers = {stem: layer for part in session.adapters.values() for stem, layer in part.items()} if adapters else {}
        use_ema = adapters and self.config.sampling.use_ema  # the average swapped in, the trained weights back after
        with (
            on_device(session.pipe, session.offloaded, session.device),
            self.ema.swapped_in() if use_ema else contextlib.nullcontext(),
        ):
            generate_samples(session.pipe, layers, session.sample_prompts, defaults, out_dir)
        log.info("samples written to %s", out_dir)
        self.report.status(state="training", message="training")

    def _save(self, kind: str) -> Path:
        """Adapter file (and resume state) now; ``kind``: "epoch", "step" or "final"."""
        step, epoch, name = self.progress.step, self.progress.epoch, self.config.saving.output_name
        path = self.run.adapter_path(name, kind, epoch=epoch, step=step)
        if not self.accelerator.is_main_process:
            return path
        try:
            self.report.status(state="saving", message=f"saving {path.name}")
            save_network(
                path,
                self.session.adapters,
                self.config,
                steps=step,
                epoch=epoch,
                started_at=self.started_at,
                dataset_dirs=self.session.dataset_dirs,
                reg_dataset_dirs=self.session.reg_dataset_dirs,
                tag_frequencies=self.session.tag_frequencies,
                thumbnail=self.run.newest_sample(self.config.saving.thumbnail_prompt)
                if self.config.saving.thumbnail
                else None,
                ema=self.ema,
            )
            if self.config.saving.save_state:
                save_train_state(
                    self.run.states_dir,
                    step,
                    trainable=self.session.trainable,
                    optimizer=self.session.optimizer,
                    lr_scheduler=self.session.lr_scheduler,
                    progress=asdict(self.progress),
                    extra={"config": to_dict(self.config), "processes": self.accelerator.num_processes}
                    | ({"ema": self.ema.state_dict()} if self.ema else {}),
                )
                prune_states(self.run.states_dir, self.config.saving.keep_last_states)
        except OSError as error:  # every write is atomic: what was saved before is still whole
            kept = self.run.read_status().get("last_adapter") or "none yet"
            raise TrainingError(
                f"could not save {path.name} in {self.run.root} ({error.strerror or error}); free disk space or "
                f"fix the folder's permissions, then resume with --resume auto. The last good adapter ({kept}) "
                "and its state are kept"
            ) from error
        if kind != "final":
            self.run.prune_adapters(self.config.saving.output_name, self.config.saving.keep_last)
        log.info("saved %s", path)
        self.report.status(state="training", message=f"saved {path.name}", last_adapter=str(path))
        return path

    def _caching_progress(self, done: int, total: int) -> None:
        if self.signals.stop:
            raise StopRequested
        if done == total or done % 10 == 0:
            self.report.status(state="caching", message=f"caching latents {done}/{total}")

    def _resume(self, resume: str) -> bool:
        """Load the state to continue from; False when ``--resume auto`` found none (start from step 0)."""
        state_dir = find_state(resume, self.run)
        if state_dir is None:
            log.info("no saved state in %s yet: starting the run from the beginning", self.run.states_dir)
            return False
        saved = read_state_extra(state_dir)
        check_resume_config(saved["config"], to_dict(self.config), state_dir)
        check_resume_processes(saved.get("processes", 1), self.accelerator.num_processes, state_dir)
        loaded = load_train_state(
            state_dir,
            trainable=self.session.trainable,
            optimizer=self.session.optimizer,
            lr_scheduler=self.session.lr_scheduler,
        )
        self.progress = Progress(**loaded["progress"])
        if self.ema is not None:
            self.ema.load_state_dict(loaded["extra"].get("ema"), state_dir)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            state_dir,
            self.progress.step,
            self.progress.epoch + 1,
            self.progress.batches_done,
        )
        return True
