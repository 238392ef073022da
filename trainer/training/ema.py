"""An exponential moving average of the adapter (``training.ema_decay``), saved beside it and sampled on request.

Small-batch training moves the adapter along a noisy path; the average of its recent weights sits nearer the
middle of that path, and often draws steadier images than the last step's weights. Every trainable adapter
tensor (LoRA factors, DoRA magnitudes, VeRA vectors) is averaged in float32 on its own device, after every
``training.ema_every_n_steps`` optimizer steps: ``ema = decay * ema + (1 - decay) * param``.

The decay warms up as OneTrainer's ``EMAModuleWrapper`` and diffusers' ``EMAModel`` (``use_ema_warmup=False``)
have it, and as ``builtin.toy_pretrain`` does: at optimizer step s (from 1) it is ``min(decay, s / (9 + s))``,
their ``(1 + t) / (10 + t)`` with t = s - 1. Without it the average starts at the untrained adapter (a LoRA's
up factor is zero, its update nothing) and forgets it slowly: with decay 0.999, 37% of the average after 1,000
steps would still be that empty start. With it the first update keeps 90% of the trained weights, and the
decay reaches 0.99 after 891 steps, 0.999 after 8,991.

Every process holds the same weights after the gradient all-reduce, so each keeps its own average and only
the main process saves it; a resume state carries it (``state_dict``), so a stopped and resumed run's average
is bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.config.training_settings import TrainingSettings
from trainer.errors import TrainStateError


class AdapterEMA:
    """The moving average of ``trainable`` (the run's parameters by name, ``network.trainable_parameters``)."""

    def __init__(self, trainable: Mapping[str, torch.nn.Parameter], decay: float, every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0 or every_n_steps < 1:
            raise ValueError(f"need 0 < decay < 1 and every_n_steps >= 1, got {decay} and {every_n_steps}")
        self.trainable = dict(trainable)
        self.decay, self.every_n_steps = decay, every_n_steps
        self.averages = {name: param.detach().to(torch.float32, copy=True) for name, param in self.trainable.items()}

    @classmethod
    def of_run(cls, trainable: Mapping[str, torch.nn.Parameter], training: TrainingSettings) -> AdapterEMA | None:
        """The run's average as ``training.ema_decay`` and ``training.ema_every_n_steps`` ask; None when it is off."""
        return cls(trainable, training.ema_decay, training.ema_every_n_steps) if training.ema_decay else None

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (from 1): warmed up, capped at ``decay``."""
        return min(self.decay, step / (9 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights of optimizer step ``step`` into the average, if the step is one of every N."""
        if step % self.every_n_steps:
            return
        weight = 1.0 - self.decay_at(step)
        # ema + (1 - decay) * (param - ema): the recurrence above, in a few fused kernels for thousands of tensors.
        torch._foreach_lerp_(
            list(self.averages.values()), [param.detach().float() for param in self.trainable.values()], weight
        )

    def record(self) -> dict[str, float | int]:
        """What the averaged file records about how it was averaged (``dora_studio.ema``)."""
        return {"decay": self.decay, "every_n_steps": self.every_n_steps}

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average inside the block (to save or sample it), the trained weights after.

        Copied in place, so every module keeps its tensors; each copy bumps the tensor's version, which is
        what a DoRA layer's cached norm is keyed on (``layers.DoRALayer._norm_key``), so no norm goes stale. The
        trained weights are kept as they are and copied back bit for bit.
        """
        with torch.no_grad():
            trained = {name: param.detach().clone() for name, param in self.trainable.items()}
            try:
                for name, param in self.trainable.items():
                    param.copy_(self.averages[name])
                yield
            finally:
                for name, param in self.trainable.items():
                    param.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name, for the resume state."""
        return dict(self.averages)

    @torch.no_grad()
    def load_state_dict(self, averages: Mapping[str, torch.Tensor] | None, state_dir: Path) -> None:
        """Take the averages a resume state saved (``state_dict``), refusing one that does not fit this run."""
        if averages is None:
            raise TrainStateError.at(
                state_dir, "holds no moving average (training.ema_decay); resume with the settings it was saved with"
            )
        if averages.keys() != self.averages.keys():
            raise TrainStateError.at(state_dir, "its moving average covers other parameters than this run trains")
        for name, average in self.averages.items():
            if averages[name].shape != average.shape:
                raise TrainStateError.at(
                    state_dir,
                    f"its moving average of {name!r} is {tuple(averages[name].shape)}, here {tuple(average.shape)}",
                )
            average.copy_(averages[name])
