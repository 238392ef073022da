"""The denoising objective: noise, timesteps, the target the UNet must predict, and the loss weights.

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


def add_noise(
    scheduler: DDPMScheduler, latents: Tensor, noise_offset: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy latents, noise, timesteps), drawn from torch's global RNG (seeded per step by the loop).

    The noise offset adds a per-channel constant so the model can learn overall brightness
    (Guttenberg 2023), as in diffusers' ``--noise_offset``.
    """
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # layout-independent
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def prediction_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {scheduler.config.prediction_type!r}")


def denoising_loss(
    scheduler: DDPMScheduler, prediction: Tensor, target: Tensor, timesteps: Tensor, min_snr_gamma: float
) -> Tensor:
    """MSE in float32, optionally weighted per sample by min-SNR-gamma (Hang et al. 2023).

    The weight is min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v-prediction, as in
    diffusers' train_text_to_image_lora_sdxl.py. A zero-terminal-SNR schedule has SNR 0 at the last step;
    its weight is taken as 1 there rather than dividing by zero.
    """
    if min_snr_gamma <= 0:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, prediction.dim())))
    return (per_sample * weights).mean()
