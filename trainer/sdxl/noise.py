"""The recipe's random draws: which timesteps train, and the noise options kohya and OneTrainer recipes use.

Every draw comes from torch's global RNG, which the loop seeds per step, so a resumed run draws the same
numbers. With the defaults (uniform over all timesteps, no shift) the timesteps are the one ``randint`` SDXL's
own training scripts draw; the other options draw only when they are on, after it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.config.training_settings import TrainingSettings


def draw_timesteps(count: int, settings: TrainingSettings, num_train_timesteps: int, device: torch.device) -> Tensor:
    """``count`` timesteps in [min_timestep, max_timestep).

    uniform: each equally likely (kohya's ``get_timesteps``). logit_normal: sigmoid(N(bias, scale)) of the
    range, SD3's and OneTrainer's. sigmoid: OneTrainer's, a density over the range rising as a sigmoid of slope
    ``timestep_scale`` centred at 0.5 + ``timestep_bias``. The shift (uniform and logit_normal) maps a draw u in
    [0, 1) to shift u / (1 + (shift - 1) u), as OneTrainer and SD3 shift; above 1 it trains noisier timesteps.
    The new distributions draw on the CPU, so a CUDA run draws what a CPU run does.
    """
    low, high = settings.min_timestep, min(settings.max_timestep, num_train_timesteps)
    distribution, shift = settings.timestep_distribution, settings.timestep_shift
    if distribution == "uniform" and shift == 1.0:
        return torch.randint(low, high, (count,), device=device)
    if distribution == "sigmoid":
        positions = torch.linspace(0, 1, high - low)
        density = torch.sigmoid(settings.timestep_scale * (positions - (0.5 + settings.timestep_bias)))
        return (low + torch.multinomial(density, count, replacement=True)).to(device)
    if distribution == "uniform":
        u = torch.rand(count)
    else:
        u = torch.sigmoid(torch.randn(count) * settings.timestep_scale + settings.timestep_bias)
    u = shift * u / (1 + (shift - 1) * u)
    return (low + (u * (high - low)).long()).clamp(low, high - 1).to(device)


def pyramid_noise(noise: Tensor, iterations: int, discount: float) -> Tensor:
    """Multires noise (kohya's ``pyramid_noise_like``, after Whitaker 2023): ever coarser noise, each level
    ``discount`` times the last's, upsampled and added, then the sum scaled back to unit std. kohya draws each
    level's size factor (2 to 4) from Python's ``random``; here from torch's, so the step's seed decides it."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    for level in range(iterations):
        factor = float(torch.rand(())) * 2 + 2
        coarse_h, coarse_w = max(1, int(height / factor**level)), max(1, int(width / factor**level))
        coarse = torch.randn((batch, channels, coarse_h, coarse_w), device=noise.device)
        noise = noise + upsample(coarse) * discount**level
        if coarse_h == 1 or coarse_w == 1:
            break
    return noise / noise.std()
