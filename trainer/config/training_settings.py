"""The ``[training]`` section: the run's length, batches, precision, and the recipe's loss, noise and timesteps.

Kept apart from the other sections (``config.schema``) because kohya and OneTrainer recipes say this much
about the objective; every option defaults to SDXL's own training (uniform timesteps, L2 loss), so a preset
that names none of them trains as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import setting

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "sigmoid")
LOSSES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class TrainingSettings:
    epochs: int = setting(10, "passes over the dataset (repeats included)", minimum=1)
    max_steps: int = setting(0, "stop after this many optimizer steps (0: epochs decide)", minimum=0)
    batch_size: int = setting(1, "images per step", minimum=1)
    gradient_accumulation: int = setting(1, "batches summed per optimizer step", minimum=1)
    processes: int = setting(
        1, "training processes on this machine, one per GPU (batch_size is per process)", minimum=1, maximum=64
    )
    process_timeout_minutes: float = setting(
        30.0,
        "how long processes wait for each other before a stuck run fails",
        minimum=1.0,
        advanced=True,
    )
    mixed_precision: str = setting(
        "bf16", "compute precision (fp16 keeps the VAE in fp32)", choices=("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: much less memory, ~25% slower")
    compile: bool = setting(
        False,
        "torch.compile the UNet: for CUDA, where it fuses kernels; the first steps take minutes to compile",
        advanced=True,
    )
    seed: int = setting(42, "seed for everything random (same seed, same run)", minimum=0)
    noise_offset: float = setting(
        0.0, "noise offset (0.03-0.1 helps very dark/bright images)", minimum=0.0, advanced=True
    )
    max_skipped_batches: int = setting(
        0,
        "batches with a non-finite loss or gradient to skip (each logged) before the run fails",
        minimum=0,
        advanced=True,
    )
    min_snr_gamma: float = setting(
        0.0, "min-SNR loss weighting gamma (5 is common; 0: off)", minimum=0.0, advanced=True
    )
    min_timestep: int = setting(
        0, "lowest timestep trained (of 1000; kohya's --min_timestep)", minimum=0, maximum=999, advanced=True
    )
    max_timestep: int = setting(
        1000, "timesteps trained are below this (kohya's --max_timestep)", minimum=1, maximum=1000, advanced=True
    )
    timestep_distribution: str = setting(
        "uniform",
        "how timesteps are drawn in [min_timestep, max_timestep): uniform; logit_normal (SD3's: sigmoid of a "
        "normal with mean timestep_bias and std timestep_scale); sigmoid (OneTrainer's: a density rising as a "
        "sigmoid of slope timestep_scale, centred at 0.5 + timestep_bias)",
        choices=TIMESTEP_DISTRIBUTIONS,
        advanced=True,
    )
    timestep_bias: float = setting(
        0.0, "logit_normal / sigmoid: where the draws centre (0: the middle; > 0: noisier)", advanced=True
    )
    timestep_scale: float = setting(1.0, "logit_normal / sigmoid: the spread", minimum=0.0, advanced=True)
    timestep_shift: float = setting(
        1.0,
        "uniform and logit_normal: shift each draw t (in 0-1) to shift*t / (1 + (shift - 1)*t); above 1 trains "
        "noisier timesteps (1: none)",
        minimum=0.0,
        advanced=True,
    )
    loss: str = setting(
        "l2",
        "l2 (mean squared error); l1; huber or smooth_l1 with huber_c and huber_schedule (kohya's --loss_type)",
        choices=LOSSES,
        advanced=True,
    )
    huber_c: float = setting(
        0.1,
        "huber / smooth_l1: the threshold between quadratic and linear (kohya's --huber_c)",
        minimum=0.0,
        advanced=True,
    )
    huber_schedule: str = setting(
        "snr",
        "huber / smooth_l1: huber_c constant, or decaying with the timestep: exponential, or by the SNR "
        "(kohya's --huber_schedule)",
        choices=HUBER_SCHEDULES,
        advanced=True,
    )
    debiased_estimation: bool = setting(
        False, "weight the loss by 1/sqrt(SNR), as kohya's --debiased_estimation_loss", advanced=True
    )
    multires_noise_iterations: int = setting(
        0,
        "pyramid (multires) noise levels added to the noise (6-10 usual; 0: off)",
        minimum=0,
        maximum=16,
        advanced=True,
    )
    multires_noise_discount: float = setting(
        0.3, "multires noise: each level's weight is this times the last's", minimum=0.0, maximum=1.0, advanced=True
    )
    ip_noise_gamma: float = setting(
        0.0, "input perturbation noise (Ning et al. 2023; 0.1 usual; 0: off)", minimum=0.0, advanced=True
    )
    ema_decay: float = setting(
        0.0,
        "keep an exponential moving average of the adapter with this decay (0.999 usual; 0: off); saved beside "
        "the adapter as NAME-ema.safetensors",
        minimum=0.0,
        maximum=0.99999,
        advanced=True,
    )
    ema_every_n_steps: int = setting(1, "update the average every N optimizer steps", minimum=1, advanced=True)
