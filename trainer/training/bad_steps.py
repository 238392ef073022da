"""What a step with a non-finite loss or gradient does: skipped while ``training.max_skipped_batches`` allows,
otherwise the run stops with the usual fixes, keeping the last saved adapter and state."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from accelerate import Accelerator

from trainer.config.schema import TrainConfig
from trainer.errors import TrainingError

from .progress import Progress

log = logging.getLogger("dora_studio")


def finite_step(
    accelerator: Accelerator,
    trainable: Iterable[torch.nn.Parameter],
    loss: float,
    config: TrainConfig,
    progress: Progress,
) -> bool:
    """Clip, and check loss and gradient norm; False: skip this group (allowed), or raise to fail the run.

    With fp16 the gradient scaler itself skips steps whose gradients overflow, so only the loss is
    checked there.
    """
    problem = None if math.isfinite(loss) else f"the loss became {loss}"
    if problem is None:
        fp16 = config.training.mixed_precision == "fp16"
        max_norm = config.optimizer.max_grad_norm
        if max_norm > 0 or not fp16:
            norm = accelerator.clip_grad_norm_(trainable, max_norm or math.inf)
            if not fp16 and not math.isfinite(float(norm)):
                problem = f"the gradient norm became {float(norm)}"
    if problem is None:
        return True
    where = f"{problem} at step {progress.step + 1}"
    if progress.skipped_batches < config.training.max_skipped_batches:
        progress.skipped_batches += 1
        log.warning(
            "%s: batch skipped (%d of %d allowed)", where, progress.skipped_batches, config.training.max_skipped_batches
        )
        return False
    raise TrainingError(
        f"{where}; the run stops here and the last saved adapter and state are kept. Usual fixes: lower the "
        'learning rate, use mixed_precision = "bf16" instead of fp16, lower noise_offset, or allow a few '
        "bad batches with training.max_skipped_batches"
    )
