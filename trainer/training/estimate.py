"""``dora-studio estimate``: the accelerator memory a run needs, before it starts and without a GPU.

One training step and one sampling pass of the run are done by the run's own code (its adapters, quantized
base, caches and offloading, checkpointing, loss, gradient clipping and optimizer) on fake tensors
(``FakeTensorMode``: shapes and dtypes, no memory, no arithmetic), built from the model's configs, for the
largest bucket of the dataset. ``training.memory.MemoryTracker`` counts what they allocate. The step is a
steady-state one, with the optimizer state already there, as in every step after the first.

What it does not see: the CUDA allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces and the CUDA
context (a few hundred MB), and ops whose memory differs between CPU and CUDA kernels: autocast follows
the CPU's rules here. ``tests/test_memory_estimate.py`` checks the counting against real CPU allocations.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from trainer.builtin.resolve import BUILTIN_PREFIX, builtin_architecture
from trainer.config.schema import TrainConfig
from trainer.data.buckets import make_buckets
from trainer.data.check import report_for_scan
from trainer.errors import StudioError
from trainer.sdxl.configs import Architecture

from .dataset_config import scan_configured
from .placement import weight_dtype
from .simulated_run import SimulatedRun

GB = 1e9
TOKENS = 77
CPU = torch.device("cpu")  # the fake tensors' device; their memory is counted, not used


@dataclass
class MemoryEstimate:
    """Bytes on the accelerator at a training step's peak, itemised, and at the sampling peak."""

    bucket: tuple[int, int]  # (width, height) the step was counted at
    batch_size: int
    base_weights: dict[str, int]  # on the device while training: unet, text encoders, vae
    adapter: int  # trainable parameters
    gradients: int
    optimizer_state: int
    activations: int  # activations and temporaries at the step's peak (with the gradients alive then)
    training_peak: int
    sampling_peak: int | None  # None: the run draws no samples
    offloaded: tuple[str, ...]  # in CPU memory while training
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.sampling_peak or 0)

    def to_json(self) -> dict:
        def gb(value: int | None) -> float | None:
            return None if value is None else round(value / GB, 3)

        return {
            "bucket": list(self.bucket),
            "batch_size": self.batch_size,
            "base_weights_gb": {name: gb(size) for name, size in self.base_weights.items()},
            "adapter_gb": gb(self.adapter),
            "gradients_gb": gb(self.gradients),
            "optimizer_state_gb": gb(self.optimizer_state),
            "activations_gb": gb(self.activations),
            "training_peak_gb": gb(self.training_peak),
            "sampling_peak_gb": gb(self.sampling_peak),
            "peak_gb": gb(self.peak),
            "offloaded": list(self.offloaded),
            "notes": self.notes,
        }


def run_architecture(config: TrainConfig) -> Architecture:
    """The configs of the run's model: a built-in's, or the json files of its diffusers (config) folder."""
    path = config.model.path
    if path.startswith(BUILTIN_PREFIX):
        return builtin_architecture(path)
    model = Path(path)
    if model.is_dir():
        return Architecture.from_folder(model)
    return Architecture.from_folder(Path(config.model.config_dir) if config.model.config_dir else model.with_suffix(""))


def largest_bucket(config: TrainConfig) -> tuple[int, int]:
    """The largest bucket the dataset uses, or, with no dataset to look at, the largest the settings allow."""
    spec = config.dataset.bucket_spec()
    with contextlib.suppress(StudioError, OSError):
        report = report_for_scan(scan_configured(config), spec, 1)
        if report.bucket_counts:
            return max(report.bucket_counts, key=lambda bucket: bucket[0] * bucket[1])
    return max(make_buckets(spec), key=lambda bucket: bucket[0] * bucket[1])


def estimate_run(
    config: TrainConfig, architecture: Architecture | None = None, fused_optimizer: bool = True
) -> MemoryEstimate:
    """Count a steady-state training step and a sampling pass of ``config``'s run on fake tensors.

    ``fused_optimizer``: AdamW's single kernel, as a CUDA run uses; a CPU run loops over tensors instead.
    """
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")  # fake tensors' data_ptr, configs' unused keys
        arch = architecture or run_architecture(config)
        run = SimulatedRun(config, arch, largest_bucket(config), fused_optimizer)
        training_peak, activations = run.count_training_step()
        sampling_peak = run.count_sampling() if config.sampling.prompts else None
    return MemoryEstimate(
        bucket=run.bucket,
        batch_size=config.training.batch_size,
        base_weights=run.base_weights,
        adapter=run.adapter_bytes,
        gradients=run.adapter_bytes,
        optimizer_state=run.state_bytes,
        activations=activations,
        training_peak=training_peak,
        sampling_peak=sampling_peak,
        offloaded=run.offloaded,
        notes=run.notes,
    )


def format_estimate(estimate: MemoryEstimate) -> str:
    numbers = estimate.to_json()
    width, height = estimate.bucket
    lines = [f"largest bucket {width}x{height}, batch {estimate.batch_size}:"]
    for name, size in numbers["base_weights_gb"].items():
        lines.append(f"  {name + ' weights':<28}{size:>8.2f} GB")
    items = {
        "adapter_gb": "adapter",
        "gradients_gb": "gradients",
        "optimizer_state_gb": "optimizer state",
        "activations_gb": "activations + temporaries",
        "training_peak_gb": "training step peak",
        "sampling_peak_gb": "sampling peak",
    }
    for key, label in items.items():
        if numbers[key] is not None:
            lines.append(f"  {label:<28}{numbers[key]:>8.2f} GB")
    if estimate.offloaded:
        lines.append(f"  in CPU memory while training: {', '.join(estimate.offloaded)}")
    lines += [f"  note: {note}" for note in estimate.notes]
    return "\n".join(lines)


def device_memory() -> int | None:
    """Total memory of the first CUDA device, if there is one."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def advice(estimate: MemoryEstimate, config: TrainConfig) -> list[str]:
    """Settings that would bring the peak down, each with what it saves where that is known."""
    tips = []
    unet = estimate.base_weights.get("unet", 0)
    if config.model.base_precision != "nf4" and unet:
        # NF4 keeps 4.5 bits of the 16 a bf16 weight has (codes and block scales)
        nf4 = unet * 4.5 / (8 * torch.empty((), dtype=weight_dtype(config)).element_size())
        if config.model.base_precision == "fp8":
            nf4 = unet * 4.5 / 8.5
        tips.append(f'model.base_precision = "nf4": the UNet\'s weights take about {nf4 / GB:.1f} GB instead of '
                    f"{unet / GB:.1f} GB (QDoRA / QLoRA)")  # fmt: skip
    if not config.training.gradient_checkpointing:
        tips.append(f"training.gradient_checkpointing = true: recomputes most of the {estimate.activations / GB:.1f} "
                    "GB of activations in backward instead of keeping them (about 25% slower)")  # fmt: skip
    if config.training.batch_size > 1:
        tips.append(f"training.batch_size = 1 with training.gradient_accumulation = {config.training.batch_size}: "
                    "the same images per optimizer step, a quarter to a half of the activations")  # fmt: skip
    if estimate.sampling_peak and estimate.sampling_peak > estimate.training_peak:
        tips.append("sampling is the peak (the VAE decodes in fp32): smaller sample sizes (--w, --h in "
                    "sampling.prompts), or sampling.every_n_epochs = 0")  # fmt: skip
    if config.network.rank > 8 and not config.network.uses_projections:  # VeRA's rank costs next to nothing
        tips.append(
            f"network.rank = 8: the adapter, its gradients and optimizer state are "
            f"{(estimate.adapter * 2 + estimate.optimizer_state) / GB:.2f} GB at rank {config.network.rank}"
        )
    return tips
