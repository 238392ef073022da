"""The denoising objective: the noise schedule, the forward process, the target the UNet must predict, and the
loss weights. Shared by adapter training and the toy model's pretraining.

Written to match diffusers' SDXL training scripts line by line (noise offset, min-SNR weighting,
v-prediction), with diffusers' own ``compute_snr`` and ``rescale_zero_terminal_snr`` doing the math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor

HUBER_LOSSES = ("huber", "smooth_l1")


def training_noise_scheduler(scheduler_config: dict, prediction_type: str, zero_terminal_snr: bool) -> DDPMScheduler:
    """The model's own beta schedule as a DDPM scheduler, which is what training adds noise with.

    Zero terminal SNR (Lin et al. 2023) rescales the betas so the last timestep is pure noise; diffusers'
    ``rescale_betas_zero_snr`` does exactly that from the same config.
    """
    config = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}
    config.update(prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)
    return DDPMScheduler.from_config(config)


def add_noise(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The forward process: sqrt(a_t) x + sqrt(1 - a_t) noise."""
    return scheduler.add_noise(latents, noise.to(latents.dtype), timesteps)


def prediction_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {scheduler.config.prediction_type!r}")


def huber_threshold(scheduler: DDPMScheduler, timesteps: Tensor, huber_c: float, schedule: str) -> Tensor:
    """kohya's ``get_huber_threshold_if_needed``: constant, decaying exponentially from 1 at t = 0 to
    ``huber_c`` at the last timestep, or by the noise level: (1 - c) / (1 + sigma_t)^2 + c."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float())
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber schedule {schedule!r}")


def elementwise_loss(prediction: Tensor, target: Tensor, loss: str, threshold: Tensor | None = None) -> Tensor:
    """kohya's ``conditional_loss`` without reduction, in float32; ``threshold`` [B]: the huber / smooth_l1
    c of each sample. L2 is ``F.mse_loss``, exactly what training computed before the other losses existed."""
    prediction, target = prediction.float(), target.float()
    if loss == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    c = threshold.view(-1, *([1] * (prediction.dim() - 1)))
    if loss == "huber":
        return 2 * c * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    if loss == "smooth_l1":
        return 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    raise ValueError(f"unknown loss {loss!r}")


def denoising_loss(
    scheduler: DDPMScheduler,
    prediction: Tensor,
    target: Tensor,
    timesteps: Tensor,
    min_snr_gamma: float,
    pixel_weights: Tensor | None = None,
    *,
    loss: str = "l2",
    huber_c: float = 0.1,
    huber_schedule: str = "snr",
    debiased: bool = False,
) -> Tensor:
    """Per-sample MSE in float32 ([B]), optionally weighted per latent pixel (masked loss) and by
    min-SNR-gamma (Hang et al. 2023).

    Per sample, so the loop can weigh each process's share of a global batch exactly. ``pixel_weights``
    ([B, 1, h, w], ``data.masks.mask_weights``) multiply the squared error before the usual mean over every
    latent pixel, as kohya's ``apply_masked_loss`` does; the mean is not divided by the mask's area (OneTrainer's
    ``normalize_masked_area_loss``, off by default there too), so the loss keeps kohya's scale, and an image
    with a small mask adds a small gradient rather than its few pixels' error magnified many times over.
    The min-SNR weight is min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v-prediction,
    as in diffusers' train_text_to_image_lora_sdxl.py. A zero-terminal-SNR schedule has SNR 0 at the last
    step; its weight is taken as 1 there rather than dividing by zero.

    ``loss``, ``huber_c`` and ``huber_schedule`` choose the elementwise loss (``elementwise_loss``) as kohya's
    ``--loss_type``; ``debiased`` weighs each sample by 1/sqrt(SNR) (v-prediction: 1/(SNR + 1)), SNR capped at
    1000, as kohya's ``--debiased_estimation_loss``. They compose in kohya's order: elementwise loss, pixel
    weights, mean, min-SNR, debiasing.
    """
    threshold = huber_threshold(scheduler, timesteps, huber_c, huber_schedule) if loss in HUBER_LOSSES else None
    error = elementwise_loss(prediction, target, loss, threshold)  # [B, C, h, w]
    if pixel_weights is not None:
        error = error * pixel_weights
    per_sample = error.mean(dim=list(range(1, prediction.dim())))
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if min_snr_gamma > 0:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        if v_prediction:
            weights = clipped / (snr + 1)
        else:
            weights = torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        per_sample = per_sample * weights
    if debiased:
        snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000.0)
        per_sample = per_sample * (1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr))
    return per_sample
