"""The denoising objective against hand formulas (DDPM, Lin et al. 2023, Hang et al. 2023) and diffusers.

Expected values are computed here in float64 from the betas of the config, never read back from the
module under test, so a wrong schedule, target or weight fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from trainer.config.training_settings import TrainingSettings
from trainer.sdxl.configs import SDXL_SCHEDULER_CONFIG
from trainer.sdxl.objective import add_noise, denoising_loss, prediction_target, training_noise_scheduler
from trainer.sdxl.text_encoding import encode_captions
from trainer.training.step import draw_step_noise


def scaled_linear_alphas_cumprod(config: dict, zero_terminal_snr: bool = False) -> torch.Tensor:
    """SDXL's "scaled_linear" schedule by hand: betas evenly spaced in sqrt, then their running product."""
    betas = (
        torch.linspace(
            math.sqrt(config["beta_start"]),
            math.sqrt(config["beta_end"]),
            config["num_train_timesteps"],
            dtype=torch.float64,
        )
        ** 2
    )
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def per_sample(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return values[timesteps].reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_scheduler_keeps_the_models_betas(prediction_type):
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, prediction_type, zero_terminal_snr=False)
    euler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)  # what the pipeline samples with
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.num_train_timesteps == 1000
    torch.testing.assert_close(scheduler.alphas_cumprod, euler.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG), rtol=1e-5, atol=1e-7
    )


def test_training_scheduler_ignores_private_config_keys():
    config = {**SDXL_SCHEDULER_CONFIG, "_diffusers_version": "0.0.1", "_name_or_path": "/somewhere/else"}
    scheduler = training_noise_scheduler(config, "epsilon", zero_terminal_snr=False)
    reference = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)


def test_zero_terminal_snr_rescales_the_betas():
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr=True)
    plain = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr=False)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert plain.alphas_cumprod[-1].item() > 1e-3  # the plain schedule never reaches pure noise
    expected = scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG, zero_terminal_snr=True)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=1e-4, atol=1e-7)
    # Lin et al. Algorithm 1 keeps the first step's sqrt(alpha_bar) and moves sqrt(alpha_bar) linearly
    original = scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG).sqrt()
    shifted = (original - original[-1]) * original[0] / (original[0] - original[-1])
    torch.testing.assert_close(scheduler.alphas_cumprod.double().sqrt(), shifted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_is_the_ddpm_forward_process(dtype):
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    latents = torch.randn(6, 4, 5, 3).to(dtype)
    torch.manual_seed(11)
    noise, timesteps = _noise(scheduler, latents, noise_offset=0.0)
    noisy = add_noise(scheduler, latents, noise, timesteps)
    assert noisy.dtype == dtype and noise.shape == latents.shape and timesteps.shape == (6,)
    assert timesteps.dtype == torch.int64 and 0 <= timesteps.min() and timesteps.max() < 1000
    assert len(set(timesteps.tolist())) > 1  # one timestep per sample, not one for the batch
    alphas_cumprod = scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG)
    expected = (
        per_sample(alphas_cumprod.sqrt(), timesteps) * latents.double()
        + per_sample((1 - alphas_cumprod).sqrt(), timesteps) * noise.double()
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(noisy.double(), expected, rtol=tolerance, atol=tolerance)


def _noise(scheduler, latents, noise_offset):
    drawn = draw_step_noise(
        latents.shape[0],
        tuple(latents.shape[1:]),
        scheduler.config.num_train_timesteps,
        TrainingSettings(noise_offset=noise_offset),
        latents.device,
    )
    return drawn.noise, drawn.timesteps


def test_a_process_share_of_the_step_noise_is_the_same_rows_of_the_global_draw():
    """Two processes each taking their rows of one global draw see what one process sees."""
    torch.manual_seed(3)
    whole = draw_step_noise(4, (4, 6, 5), 1000, TrainingSettings(noise_offset=0.1), torch.device("cpu"))
    torch.manual_seed(3)
    again = draw_step_noise(4, (4, 6, 5), 1000, TrainingSettings(noise_offset=0.1), torch.device("cpu"))
    second_half = again.rows(2, 2)
    assert torch.equal(second_half.noise, whole.noise[2:]) and torch.equal(second_half.latent, whole.latent[2:])
    assert torch.equal(second_half.timesteps, whole.timesteps[2:])


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    latents = torch.randn(3, 4, 6, 5)
    offsets = {}
    for noise_offset in (0.0, 0.1, 0.3):
        torch.manual_seed(5)
        noise, timesteps = _noise(scheduler, latents, noise_offset)
        noisy = add_noise(scheduler, latents, noise, timesteps)
        offsets[noise_offset] = noise
        alphas_cumprod = scheduler.alphas_cumprod
        expected = (
            per_sample(alphas_cumprod.sqrt(), timesteps) * latents
            + per_sample((1 - alphas_cumprod).sqrt(), timesteps) * noise
        )
        torch.testing.assert_close(noisy, expected)  # the offset noise is the noise that gets added
    for noise_offset in (0.1, 0.3):
        shift = offsets[noise_offset] - offsets[0.0]
        per_channel = shift[:, :, :1, :1]
        torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-6)  # constant over H, W
        assert per_channel.flatten().unique().numel() == 12  # a different constant per (sample, channel)
        assert per_channel.abs().max() > 0
    # the constant is noise_offset times one standard normal draw per (sample, channel)
    torch.testing.assert_close(
        (offsets[0.3] - offsets[0.0]) / 0.3, (offsets[0.1] - offsets[0.0]) / 0.1, rtol=1e-4, atol=1e-4
    )


def test_prediction_targets_by_hand():
    latents, noise = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    timesteps = torch.tensor([0, 250, 700, 999])
    epsilon = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    assert torch.equal(prediction_target(epsilon, latents, noise, timesteps), noise)
    for zero_terminal_snr in (False, True):
        v_pred = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr)
        alphas_cumprod = scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG, zero_terminal_snr)
        expected = (
            per_sample(alphas_cumprod.sqrt(), timesteps) * noise.double()
            - per_sample((1 - alphas_cumprod).sqrt(), timesteps) * latents.double()
        )
        torch.testing.assert_close(
            prediction_target(v_pred, latents, noise, timesteps).double(), expected, rtol=1e-4, atol=1e-5
        )
    # with zero terminal SNR the last step is pure noise, where the velocity is minus the clean latents
    v_pred = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr=True)
    torch.testing.assert_close(
        prediction_target(v_pred, latents, noise, timesteps)[3], -latents[3], rtol=1e-5, atol=1e-5
    )


def test_unknown_prediction_type_is_refused():
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "sample", zero_terminal_snr=False)
    with pytest.raises(ValueError, match="sample"):
        prediction_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_without_gamma_is_plain_mse(prediction_type):
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, prediction_type, zero_terminal_snr=False)
    prediction, target = torch.randn(3, 4, 5, 5, dtype=torch.bfloat16), torch.randn(3, 4, 5, 5)
    timesteps = torch.tensor([0, 500, 999])
    loss = denoising_loss(scheduler, prediction, target, timesteps, min_snr_gamma=0.0).mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.mse_loss(prediction.float(), target))
    by_hand = ((prediction.double() - target.double()) ** 2).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def min_snr_loss_by_hand(prediction, target, timesteps, gamma, prediction_type, zero_terminal_snr):
    alphas_cumprod = scaled_linear_alphas_cumprod(SDXL_SCHEDULER_CONFIG, zero_terminal_snr)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        weights = torch.where(snr > 0, clipped / snr.clamp_min(1e-300), torch.ones_like(snr))
    else:
        weights = clipped / (snr + 1)
    per_sample_mse = ((prediction.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    return (per_sample_mse * weights).mean(), weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_by_hand(prediction_type):
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, prediction_type, zero_terminal_snr=False)
    timesteps = torch.tensor([0, 20, 150, 400, 999])  # SNR from about 1000 down to about 0.005: both sides of 5
    prediction, target = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    gamma = 5.0
    loss = denoising_loss(scheduler, prediction, target, timesteps, gamma).mean()
    expected, weights = min_snr_loss_by_hand(prediction, target, timesteps, gamma, prediction_type, False)
    assert weights.min() < 1 and (weights < 1).sum() >= 2  # the clip is active somewhere
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    plain = F.mse_loss(prediction, target)
    assert abs(loss.item() - plain.item()) > 1e-3  # weighting changed something


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_with_zero_terminal_snr_is_finite(prediction_type):
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, prediction_type, zero_terminal_snr=True)
    timesteps = torch.tensor([999, 999, 500])
    prediction, target = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    loss = denoising_loss(scheduler, prediction, target, timesteps, min_snr_gamma=5.0).mean()
    assert torch.isfinite(loss)
    expected, weights = min_snr_loss_by_hand(prediction, target, timesteps, 5.0, prediction_type, True)
    # SNR 0: epsilon takes weight 1 instead of 0/0; v-prediction's min(0, gamma) / (0 + 1) is 0, as in diffusers
    assert weights[0].item() == (1.0 if prediction_type == "epsilon" else 0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # only the t=999 samples: epsilon gives their plain MSE, v-prediction nothing
    only_last = denoising_loss(scheduler, prediction[:2], target[:2], timesteps[:2], min_snr_gamma=5.0).mean()
    plain = F.mse_loss(prediction[:2], target[:2]).item()
    assert only_last.item() == pytest.approx(plain if prediction_type == "epsilon" else 0.0, rel=1e-5, abs=1e-7)


def test_min_snr_gamma_loss_has_finite_gradients_at_the_last_step():
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=True)
    prediction = torch.randn(2, 4, 3, 3, requires_grad=True)
    denoising_loss(scheduler, prediction, torch.randn(2, 4, 3, 3), torch.tensor([999, 0]), 5.0).mean().backward()
    assert torch.isfinite(prediction.grad).all()


# --- text encoding: the same conditioning as diffusers' StableDiffusionXLPipeline.encode_prompt ---------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    from trainer.sdxl.model_files import load_sdxl_pipeline

    # one thread: on a busy shared CPU, two threads spin-waiting on each other make the tiny encoders ~10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_sdxl_pipeline(tiny_dir)
    torch.set_num_threads(threads)


LONG_CAPTION = "zqx, " + ", ".join(f"tag{i}" for i in range(40))  # one token per character here: far over 77


def test_encode_captions_matches_the_pipeline(tiny_pipe):
    pipe = tiny_pipe
    captions = ["zqx, a red cube on a table", "", LONG_CAPTION]
    assert len(pipe.tokenizer(LONG_CAPTION).input_ids) > pipe.tokenizer.model_max_length
    with torch.no_grad():
        embeds, pooled = encode_captions(
            (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), captions, torch.device("cpu")
        )
        expected_embeds, _, expected_pooled, _ = pipe.encode_prompt(
            captions, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert embeds.shape == (3, 77, width)
    assert pooled.shape == (3, pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(embeds, expected_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(embeds[0], embeds[1])  # the captions really were encoded


def test_encode_captions_truncates_to_77_tokens(tiny_pipe):
    pipe = tiny_pipe
    encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    longer = LONG_CAPTION + ", and a great deal more text that lies past the limit"
    with torch.no_grad():
        embeds, pooled = encode_captions(*encoders, [LONG_CAPTION, longer], torch.device("cpu"))
        expected_embeds, _, expected_pooled, _ = pipe.encode_prompt(
            longer, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(embeds[0], embeds[1], rtol=0, atol=1e-6)  # what lies past 77 tokens is dropped
    torch.testing.assert_close(pooled[0], pooled[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(embeds[1:], expected_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[1:], expected_pooled, rtol=0, atol=1e-6)
