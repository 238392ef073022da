"""Several training processes (GPUs, machines) acting as one: the accelerator, and what they share.

accelerate sets up devices, mixed precision and the process group (gloo on CPU, NCCL on GPUs). The
models are not wrapped in DDP: the adapters' gradients are averaged here in one flat all-reduce, which
covers the text encoders and layers skipped by module dropout alike, and leaves the pipeline's modules
as they are for sampling. Each helper is a no-op with one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from trainer.config.schema import TrainConfig
from trainer.errors import TrainingError
from trainer.runs.run_directory import COMMANDS


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The timeout bounds how long the others wait when one process dies, so a run fails instead of hanging."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=config.training.process_timeout_minutes))
    # accelerate treats processes launched by torchrun as a CPU group (gloo) only when told it runs on CPU
    cpu_group = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=config.training.mixed_precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[timeout],
        cpu=cpu_group,
    )


@contextlib.contextmanager
def _peer_failures() -> Iterator[None]:
    """A collective that fails because another process died (or timed out) ends the run with a clear reason."""
    try:
        yield
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError / DistBackendError (a subclass)
        raise TrainingError(
            f"another training process stopped or stopped answering ({str(error).splitlines()[0][:200]}); this run "
            "stops too. Its log says why; the last saved adapter and state are kept: resume with --resume auto"
        ) from error


def average_gradients(accelerator: Accelerator, params: Iterable[torch.nn.Parameter]) -> None:
    """Each parameter's gradient becomes its mean over processes (what DDP does, in one all-reduce)."""
    if accelerator.num_processes == 1:
        return
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    with _peer_failures():
        torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()


def sum_over_processes(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    with _peer_failures():
        torch.distributed.all_reduce(total)
    return float(total.item())


def agree_on_commands(accelerator: Accelerator, commands: set[str]) -> set[str]:
    """The union of every process's commands, so all of them stop, save or sample at the same step."""
    if accelerator.num_processes == 1:
        return commands
    flags = torch.tensor([float(c in commands) for c in COMMANDS], device=accelerator.device)
    with _peer_failures():
        torch.distributed.all_reduce(flags)
    return {command for command, flag in zip(COMMANDS, flags.tolist(), strict=True) if flag > 0}
