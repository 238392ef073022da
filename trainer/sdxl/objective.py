"""The denoising objective: the noise schedule, the forward process, the target the UNet must predict, and the
loss weights. Shared by adapter training and the toy model's pretraining.

Written to match diffusers' SDXL training scripts line by line (noise offset, min-SNR weighting,
v-prediction), with diffusers' own ``compute_snr`` and ``rescale_zero_terminal_snr`` doing the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor


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


def denoising_loss(
    scheduler: DDPMScheduler,
    prediction: Tensor,
    target: Tensor,
    timesteps: Tensor,
    min_snr_gamma: float,
    pixel_weights: Tensor | None = None,
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
    """
    squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # [B, C, h, w]
    if pixel_weights is not None:
        squared_error = squared_error * pixel_weights
    per_sample = squared_error.mean(dim=list(range(1, prediction.dim())))
    if min_snr_gamma <= 0:
        return per_sample
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    return per_sample * weights
