"""One training step's arithmetic: its seed, its random draws, the captions' conditioning and the denoising loss.

Kept apart from the loop's bookkeeping (``trainer.training.loop``) so the lines that decide what is learned
read in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.config.training_settings import TrainingSettings
from trainer.data.batches import Batch
from trainer.data.latent_cache import encode_moments, sample_latents
from trainer.data.masks import mask_weights
from trainer.sdxl.noise import draw_timesteps, pyramid_noise
from trainer.sdxl.objective import add_noise, denoising_loss, prediction_target
from trainer.sdxl.text_encoding import encode_captions

from .setup import Session


@dataclass(frozen=True)
class StepNoise:
    """Every random draw of one step, for the whole global batch (all processes together).

    Drawn for the global batch from the step's seed, then each process takes its own rows, so a sample
    gets the same noise whether 1 or N processes train: multi-process runs match single-process ones.
    """

    latent: Tensor  # eps for sampling the VAE posterior
    noise: Tensor  # what the UNet must find (noise offset and multires noise included)
    timesteps: Tensor
    perturbation: Tensor | None = None  # input perturbation: noised into the input only, never the target

    def rows(self, start: int, count: int) -> StepNoise:
        part = slice(start, start + count)
        perturbation = self.perturbation[part] if self.perturbation is not None else None
        return StepNoise(self.latent[part], self.noise[part], self.timesteps[part], perturbation)


def draw_step_noise(
    count: int, latent_shape: tuple[int, ...], num_timesteps: int, settings: TrainingSettings, device: torch.device
) -> StepNoise:
    """Drawn from torch's global RNG (seeded per step by the loop), by shape (never ``*_like``, whose
    layout could follow a channels-last input and reorder the numbers), in kohya's order.

    The noise offset adds a per-channel constant so the model can learn overall brightness
    (Guttenberg 2023), as in diffusers' ``--noise_offset``; multires noise (``sdxl.noise.pyramid_noise``)
    follows it. Input perturbation (Ning et al. 2023, kohya's ``--ip_noise_gamma``) is extra noise in the
    UNet's input that the target does not contain. Options that are off draw nothing, so the defaults draw
    exactly what SDXL's training scripts draw.
    """
    latent = torch.randn((count, *latent_shape), device=device)
    noise = torch.randn((count, *latent_shape), device=device)
    if settings.noise_offset > 0:
        noise = noise + settings.noise_offset * torch.randn(count, latent_shape[0], 1, 1, device=device)
    timesteps = draw_timesteps(count, settings, num_timesteps, device)
    if settings.multires_noise_iterations:
        noise = pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount)
    perturbation = None
    if settings.ip_noise_gamma > 0:
        perturbation = settings.ip_noise_gamma * torch.randn((count, *latent_shape), device=device)
    return StepNoise(latent, noise, timesteps, perturbation)


def step_seed(seed: int, micro_step: int) -> int:
    """The torch seed of one micro-batch: noise, timesteps and adapter dropout replay exactly on resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{micro_step}".encode()).digest()[:8], "little") >> 1


def _conditioning(session: Session, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pipe, device = session.pipe, session.device
    if session.text_cache is not None:
        embeds, pooled = zip(*(session.text_cache[caption] for caption in captions))
        return torch.stack(embeds), torch.stack(pooled)
    # trained encoders follow the caller's grad mode: on in a training step, off while validating
    grad = contextlib.nullcontext() if session.trains_text_encoders else torch.no_grad()
    with grad:
        return encode_captions(
            (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), captions, device
        )


def training_loss(session: Session, unet, batch: Batch, step_noise: StepNoise, autocast) -> torch.Tensor:
    """Per-sample denoising losses of one batch, as SDXL was trained (diffusers' train_text_to_image_sdxl.py).

    ``step_noise`` holds this batch's rows of the step's draws; ``autocast`` is the accelerator's. With masked
    loss the batch's masks weigh each latent pixel, ``dataset.unmasked_weight`` where a mask is black.
    """
    vae = session.pipe.vae
    moments = batch.moments if batch.moments is not None else encode_moments(vae, batch.pixels.to(session.device))
    latents = sample_latents(moments.to(session.device, torch.float32), vae.config.scaling_factor, step_noise.latent)
    with autocast():
        embeds, pooled = _conditioning(session, batch.captions)
        noised = step_noise.noise if step_noise.perturbation is None else step_noise.noise + step_noise.perturbation
        noisy = add_noise(session.noise_scheduler, latents, noised, step_noise.timesteps)
        prediction = unet(
            noisy,
            step_noise.timesteps,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids.to(session.device)},
        ).sample
    target = prediction_target(session.noise_scheduler, latents, step_noise.noise, step_noise.timesteps)
    weights = None
    if batch.mask is not None:
        weights = mask_weights(batch.mask.to(session.device), session.config.dataset.unmasked_weight)
    recipe = session.config.training
    return denoising_loss(
        session.noise_scheduler,
        prediction,
        target,
        step_noise.timesteps,
        recipe.min_snr_gamma,
        weights,
        loss=recipe.loss,
        huber_c=recipe.huber_c,
        huber_schedule=recipe.huber_schedule,
        debiased=recipe.debiased_estimation,
    )


def latent_shape(session: Session, batch: Batch) -> tuple[int, ...]:
    """(channels, height, width) of the batch's latents, known before they are sampled."""
    if batch.moments is not None:
        channels, height, width = batch.moments.shape[1:]
        return channels // 2, height, width
    vae = session.pipe.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return vae.latent_channels, batch.pixels.shape[2] // factor, batch.pixels.shape[3] // factor
