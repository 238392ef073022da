"""Validation loss: the training objective on held-out images, at noise and timesteps fixed for the whole run.

Every measurement sees the same images, crops, captions, noise and timesteps, so the curve moves only when the
adapter does: it rises when the adapter starts to memorise its training images. The noise of image ``i`` at
timestep ``t`` comes from a generator seeded by (``validation.seed``, i, t), drawn on the CPU, so a resumed run,
another device, another batch size or another number of processes measures the same number. The timesteps are
the five kohya sd-scripts' validation uses, spread over the schedule: one timestep alone would say little.
"""

from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator

from trainer.data.batches import EpochBatches
from trainer.data.captions import process_caption
from trainer.data.epoch_plan import PlannedImage, TrainExample, centred_crop

from .processes import sum_over_processes
from .sampling import eval_mode
from .setup import Session
from .step import StepNoise, latent_shape, training_loss

VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya sd-scripts' validation timesteps (of 1000)


def validation_batches(examples: list[TrainExample], session: Session, batch_size: int) -> list[list[PlannedImage]]:
    """The held-out images in batches that never mix buckets: centred crops, no flip, fixed captions."""
    by_bucket: dict[tuple[int, int], list[PlannedImage]] = {}
    for index, example in enumerate(examples):
        crop = centred_crop(example, session.augment.bucket_spec)
        caption = process_caption(example.caption, example.captions, None)
        by_bucket.setdefault(example.bucket, []).append(PlannedImage(index, crop, False, caption))
    return [
        images[start : start + batch_size]
        for _, images in sorted(by_bucket.items())
        for start in range(0, len(images), batch_size)
    ]


def fixed_noise(seed: int, images: list[PlannedImage], shape: tuple[int, ...], timestep: int) -> StepNoise:
    """The posterior draw and the noise of each image at ``timestep``, the same at every measurement."""
    latents, noises = [], []
    for image in images:
        digest = hashlib.sha256(f"validation/{seed}/{image.example}/{timestep}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        latents.append(torch.randn(shape, generator=generator))
        noises.append(torch.randn(shape, generator=generator))
    return StepNoise(torch.stack(latents), torch.stack(noises), torch.full((len(images),), timestep))


class Validation:
    """The run's validation measurement; each process measures its share of the batches."""

    def __init__(self, session: Session, accelerator: Accelerator, seed: int) -> None:
        self.session, self.accelerator, self.seed = session, accelerator, seed
        batches = validation_batches(session.validation_examples, session, session.config.training.batch_size)
        rank, processes = accelerator.process_index, accelerator.num_processes
        self.batches = batches[rank::processes]
        self.image_count = len(session.validation_examples)
        self.data = EpochBatches(
            self.batches, session.validation_examples, session.latent_cache, session.augment.background
        )

    def __bool__(self) -> bool:
        return self.image_count > 0

    def loss(self) -> float:
        """The mean loss over every held-out image and validation timestep (the same on every process)."""
        session, device = self.session, self.session.device
        total = 0.0
        models = [session.pipe.unet, session.pipe.text_encoder, session.pipe.text_encoder_2]
        with eval_mode([model for model in models if model is not None]), torch.no_grad():
            for index, images in enumerate(self.batches):
                batch = self.data[index]
                shape = latent_shape(session, batch)
                for timestep in VALIDATION_TIMESTEPS:
                    noise = fixed_noise(self.seed, images, shape, timestep)
                    noise = StepNoise(noise.latent.to(device), noise.noise.to(device), noise.timesteps.to(device))
                    losses = training_loss(session, session.pipe.unet, batch, noise, self.accelerator.autocast)
                    total += float(losses.sum())
        total = sum_over_processes(self.accelerator, total)
        return total / (self.image_count * len(VALIDATION_TIMESTEPS))
