"""The recipe options kohya and OneTrainer configs carry: timestep ranges and distributions, l1 / huber /
smooth_l1 losses with kohya's schedules, debiased estimation, multires and input-perturbation noise. Each is
checked against its formula written out here from the peers' definitions (sd-scripts'
``custom_train_functions.py`` / ``train_util.py``, OneTrainer's timestep sampling), and the defaults against
the draws training made before these options existed."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.config.parsing import from_dict
from trainer.config.training_settings import TrainingSettings
from trainer.errors import ConfigError
from trainer.sdxl.configs import SDXL_SCHEDULER_CONFIG
from trainer.sdxl.noise import draw_timesteps
from trainer.sdxl.objective import denoising_loss, huber_threshold, training_noise_scheduler
from trainer.training.step import draw_step_noise

CPU = torch.device("cpu")
SHAPE = (4, 8, 6)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return training_noise_scheduler(dict(SDXL_SCHEDULER_CONFIG), "epsilon", False)


def _snr(scheduler, timesteps):
    alphas = scheduler.alphas_cumprod.double()[timesteps]
    return alphas / (1 - alphas)


def test_default_draws_are_the_ones_training_made_before():
    torch.manual_seed(11)
    drawn = draw_step_noise(3, SHAPE, 1000, TrainingSettings(), CPU)
    torch.manual_seed(11)
    latent, noise = torch.randn((3, *SHAPE)), torch.randn((3, *SHAPE))
    timesteps = torch.randint(0, 1000, (3,))
    assert torch.equal(drawn.latent, latent) and torch.equal(drawn.noise, noise)
    assert torch.equal(drawn.timesteps, timesteps) and drawn.perturbation is None


def test_every_option_replays_from_the_step_seed_and_shards_by_rows():
    settings = TrainingSettings(
        noise_offset=0.05, multires_noise_iterations=6, ip_noise_gamma=0.1, timestep_distribution="logit_normal"
    )
    torch.manual_seed(5)
    first = draw_step_noise(4, SHAPE, 1000, settings, CPU)
    torch.manual_seed(5)
    again = draw_step_noise(4, SHAPE, 1000, settings, CPU)
    for name in ("latent", "noise", "timesteps", "perturbation"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    rows = again.rows(1, 2)
    assert torch.equal(rows.perturbation, first.perturbation[1:3]) and torch.equal(rows.noise, first.noise[1:3])


def test_multires_noise_and_input_perturbation_follow_their_definitions():
    settings = TrainingSettings(multires_noise_iterations=3, multires_noise_discount=0.3, ip_noise_gamma=0.1)
    torch.manual_seed(2)
    drawn = draw_step_noise(2, SHAPE, 1000, settings, CPU)
    torch.manual_seed(2)
    torch.randn((2, *SHAPE))  # the posterior draw
    noise = torch.randn((2, *SHAPE))
    torch.randint(0, 1000, (2,))
    for level in range(3):  # kohya's pyramid_noise_like, its size factor drawn from torch
        factor = float(torch.rand(())) * 2 + 2
        h, w = max(1, int(SHAPE[1] / factor**level)), max(1, int(SHAPE[2] / factor**level))
        coarse = torch.randn((2, SHAPE[0], h, w))
        noise = noise + torch.nn.functional.interpolate(coarse, size=SHAPE[1:], mode="bilinear") * 0.3**level
        if h == 1 or w == 1:
            break
    torch.testing.assert_close(drawn.noise, noise / noise.std(), rtol=0, atol=1e-6)
    assert drawn.noise.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(drawn.perturbation, 0.1 * torch.randn((2, *SHAPE)), rtol=0, atol=0)


def test_timestep_range_and_distributions_match_their_densities():
    count = 40_000
    torch.manual_seed(0)
    ranged = draw_timesteps(count, TrainingSettings(min_timestep=200, max_timestep=400), 1000, CPU)
    assert ranged.min() == 200 and ranged.max() == 399
    counts = torch.bincount(ranged - 200, minlength=200).double()
    assert ((counts - count / 200) ** 2 / (count / 200)).sum() < 260  # chi-square, 199 dof (p ~ 0.003)

    settings = TrainingSettings(timestep_distribution="logit_normal", timestep_bias=0.5, timestep_scale=0.8)
    u = (draw_timesteps(count, settings, 1000, CPU).double() + 0.5) / 1000
    logits = torch.log(u / (1 - u))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.02) and logits.std().item() == pytest.approx(0.8, abs=0.02)

    shifted = draw_timesteps(count, TrainingSettings(timestep_shift=3.0), 1000, CPU).double() / 1000
    for y in (0.25, 0.5, 0.75):  # P(t < y) = y / (3 - 2y) for u' = 3u / (1 + 2u), u uniform
        assert (shifted < y).double().mean().item() == pytest.approx(y / (3 - 2 * y), abs=0.01)

    sigmoid = TrainingSettings(timestep_distribution="sigmoid", timestep_scale=6.0, timestep_bias=0.1)
    drawn = draw_timesteps(count, sigmoid, 1000, CPU)
    density = torch.sigmoid(6.0 * (torch.linspace(0, 1, 1000).double() - 0.6))
    for low, high in ((0, 250), (250, 500), (500, 750), (750, 1000)):
        expected = (density[low:high].sum() / density.sum()).item()
        assert ((drawn >= low) & (drawn < high)).double().mean().item() == pytest.approx(expected, abs=0.01)


def test_losses_and_huber_schedules_are_kohyas_formulas(scheduler):
    torch.manual_seed(1)
    prediction, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    timesteps = torch.tensor([0, 500, 999])
    difference = (prediction - target).double()
    alphas = scheduler.alphas_cumprod.double()[timesteps]
    c = 0.2
    thresholds = {
        "constant": torch.full((3,), c, dtype=torch.float64),
        "exponential": torch.exp(math.log(c) * timesteps.double() / 1000),  # 1 at t = 0, c at t = 1000
        "snr": (1 - c) / (1 + ((1 - alphas) / alphas).sqrt()) ** 2 + c,
    }
    for schedule, expected in thresholds.items():
        torch.testing.assert_close(huber_threshold(scheduler, timesteps, c, schedule).double(), expected)
        k = expected.view(-1, 1, 1, 1)
        for loss, formula in (
            ("huber", 2 * k * (torch.sqrt(difference**2 + k**2) - k)),
            ("smooth_l1", 2 * (torch.sqrt(difference**2 + k**2) - k)),
        ):
            got = denoising_loss(
                scheduler, prediction, target, timesteps, 0.0, loss=loss, huber_c=c, huber_schedule=schedule
            )
            torch.testing.assert_close(got.double(), formula.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    l1 = denoising_loss(scheduler, prediction, target, timesteps, 0.0, loss="l1")
    torch.testing.assert_close(l1.double(), difference.abs().mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_composes_with_min_snr_as_kohya_does(prediction_type):
    scheduler = training_noise_scheduler(dict(SDXL_SCHEDULER_CONFIG), prediction_type, False)
    torch.manual_seed(4)
    prediction, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    timesteps = torch.tensor([0, 300, 999])
    mse = ((prediction - target).double() ** 2).mean(dim=(1, 2, 3))
    snr = _snr(scheduler, timesteps)
    v = prediction_type == "v_prediction"
    min_snr = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if v else snr)
    capped = torch.minimum(snr, torch.full_like(snr, 1000.0))
    debias = 1 / (capped + 1) if v else 1 / capped.sqrt()
    got = denoising_loss(scheduler, prediction, target, timesteps, 5.0, debiased=True)
    torch.testing.assert_close(got.double(), mse * min_snr * debias, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("training", "key"),
    [
        ({"min_timestep": 500, "max_timestep": 500}, "training.min_timestep"),
        ({"huber_c": -0.1}, "training.huber_c"),
        ({"ema_decay": 1.0}, "training.ema_decay"),
        ({"loss": "mse"}, "training.loss"),
    ],
)
def test_out_of_range_recipe_values_are_refused_naming_the_setting(training, key):
    with pytest.raises(ConfigError) as raised:
        from_dict({"dataset": {"path": "data"}, "training": training})
    assert [problem.where for problem in raised.value.problems] == [key]
