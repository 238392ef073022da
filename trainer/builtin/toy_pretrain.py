"""Pretrain ``builtin:toy-sdxl`` from scratch on pictures of flat shapes, on a CPU in well under an hour.

    dora-studio make-toy-model            # writes trainer/assets/toy-sdxl.safetensors (the default recipe)

Three stages, all seeded: draw ``pictures`` random captioned scenes (``trainer.builtin.shapes``, never a zqx);
train the VAE as an autoencoder on crops of them; encode every picture once and train the UNet to
denoise those latents (v-prediction on SDXL's noise schedule rescaled to zero terminal SNR, a 10 %
empty-caption dropout for classifier-free guidance, and an EMA of the weights, which is what ships).

Why v-prediction with zero terminal SNR (Lin et al. 2023): on SDXL's own schedule the noisiest step
still shows the picture's average colour and rough layout, so a small model learns to read them off
the noise instead of the caption; sampling then starts from pure noise and draws a random background
in a random place. Two first recipes on epsilon (stopped after 1,500 and 2,300 steps) did exactly that.
With zero terminal SNR the first sampling step sees no picture at all and must take everything from the
caption. The text encoders stay frozen random networks, their word embeddings scaled up so that a word
survives their layers (``ToyRecipe.text_embedding_scale``). The recipe is stored in the weights file's
metadata.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from trainer.files import atomic_path
from trainer.sdxl.objective import add_noise, prediction_target, training_noise_scheduler
from trainer.sdxl.text_encoding import encode_captions

from .shapes import BACKGROUNDS, COLOURS, PLAIN_SHAPES, SIZES, Scene, paint, place_centre, readable
from .toy import COMPONENTS, TOY_RESOLUTION, TOY_SCHEDULER_CONFIG, build_toy_pipeline

Log = Callable[[str], None]


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that decides the toy model's weights (with the library versions in the metadata)."""

    seed: int = 0
    pictures: int = 12288
    vae_steps: int = 800
    vae_batch_size: int = 16
    vae_crop: int = 64  # the VAE is convolutional: crops teach it edges at a quarter of the cost
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6  # as Stable Diffusion's VAE: nearly a plain autoencoder
    unet_steps: int = 4500
    unet_batch_size: int = 16
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    # The text encoders stay frozen and random. At CLIP's init scale their 12 and 32 layers wash a word out:
    # "circle" -> "square" moved text_encoder's penultimate state at that token by 10% of its norm (a
    # colour word 39%), and a model trained on them learnt shapes and places barely above chance. Token and
    # position embeddings 10x larger keep each word dominant at its own token (50-180%) while the layers
    # still mix context into the words after it (10-40%).
    text_embedding_scale: float = 10.0


def random_scene(rng: random.Random, shapes: tuple[str, ...] = PLAIN_SHAPES, resolution: int = TOY_RESOLUTION) -> Scene:
    """One picture's content, every word of its caption drawn independently."""
    shape, colour = rng.choice(shapes), rng.choice(list(COLOURS))
    background = rng.choice([name for name in BACKGROUNDS if readable(colour, name)])
    size_word = rng.choice(sorted(SIZES))
    cell = (rng.randrange(3), rng.randrange(3))
    radius = resolution * rng.uniform(*SIZES[size_word])
    size = (resolution, resolution)
    centre = place_centre(rng, size, cell, radius)
    return Scene(size, shape, colour, background, size_word, centre, radius)


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images as one uint8 tensor [N, 3, H, W]."""
    return torch.stack(
        [
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            .view(image.height, image.width, 3)
            .permute(2, 0, 1)
            for image in images
        ]
    )


def draw_pictures(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return to_tensor(paint(scene) for scene in scenes), [scene.caption for scene in scenes]


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def _learning_rate(step: int, recipe: ToyRecipe, peak: float, total: int) -> float:
    """Linear warmup, then a cosine down to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return peak * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, pixels: torch.Tensor, recipe: ToyRecipe, generator: torch.Generator, log: Log) -> None:
    """Train the autoencoder on random crops; ``pixels`` may live on any device, draws stay on the CPU."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    count, crop, side = len(pixels), recipe.vae_crop, pixels.shape[-1]
    running, started = 0.0, time.monotonic()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe, recipe.vae_learning_rate, recipe.vae_steps)
        index = torch.randint(count, (recipe.vae_batch_size,), generator=generator)
        top, left = torch.randint(side - crop + 1, (2,), generator=generator).tolist()
        batch = _to_unit_range(pixels[index.to(pixels.device), :, top : top + crop, left : left + crop])
        posterior = vae.encode(batch).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(batch)
        reconstruction = vae.decode(sample).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        if (step + 1) % 100 == 0:
            elapsed = time.monotonic() - started
            log(f"vae step {step + 1}/{recipe.vae_steps}: loss {running / 100:.5f} ({elapsed:.0f} s)")
            running = 0.0
    vae.eval()


@torch.no_grad()
def encode_pictures(vae, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Each picture's posterior (mean, std), unscaled."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(_to_unit_range(pixels[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_caption_table(pipe, captions: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(unique captions, their prompt embeddings, their pooled embeddings), on the text encoders' device."""
    unique = sorted(set(captions))
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    device = pipe.text_encoder.device
    embeds, pooled = zip(
        *(
            encode_captions(tokenizers, encoders, unique[start : start + 256], device)
            for start in range(0, len(unique), 256)
        )
    )
    return unique, torch.cat(embeds), torch.cat(pooled)


def train_unet(
    unet,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    caption_index: torch.Tensor,
    caption_table: tuple[torch.Tensor, torch.Tensor],
    recipe: ToyRecipe,
    generator: torch.Generator,
    log: Log,
    on_checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    checkpoint_every: int = 500,
) -> dict[str, torch.Tensor]:
    """Train ``unet``; returns the EMA of its weights (also handed to ``on_checkpoint`` every so often)."""
    means, stds = latents
    device = means.device
    prompt_embeds, pooled_embeds = caption_table
    scheduler = training_noise_scheduler(TOY_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr=True)
    time_ids = torch.tensor(
        [TOY_RESOLUTION, TOY_RESOLUTION, 0, 0, TOY_RESOLUTION, TOY_RESOLUTION], dtype=torch.float32, device=device
    )
    unet.train()
    parameters = list(unet.parameters())
    ema = [parameter.detach().clone() for parameter in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.unet_learning_rate, weight_decay=0.01)
    batch_size, running, started = recipe.unet_batch_size, 0.0, time.monotonic()
    for step in range(recipe.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe, recipe.unet_learning_rate, recipe.unet_steps)
        # Every random draw comes from the CPU generator, so a GPU run sees the same stream as a CPU run.
        index = torch.randint(len(means), (batch_size,), generator=generator)
        shape = (batch_size, *means.shape[1:])
        unit_noise = torch.randn(shape, generator=generator).to(device)
        noise = torch.randn(shape, generator=generator).to(device)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        keep = (torch.rand(batch_size, generator=generator) >= recipe.caption_dropout).float().to(device)
        index = index.to(device)
        clean = (means[index] + stds[index] * unit_noise) * scaling_factor
        noisy = add_noise(scheduler, clean, noise, timesteps)
        rows = caption_index[index]
        # A dropped caption is all zeros: what the SDXL pipeline feeds for an empty negative prompt.
        context = prompt_embeds[rows] * keep.view(-1, 1, 1)
        added = {"text_embeds": pooled_embeds[rows] * keep.view(-1, 1), "time_ids": time_ids.expand(batch_size, -1)}
        prediction = unet(noisy, timesteps, context, added_cond_kwargs=added).sample
        loss = F.mse_loss(prediction, prediction_target(scheduler, clean, noise, timesteps))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [parameter.detach() for parameter in parameters], 1 - decay)
        running += loss.detach()
        if (step + 1) % 100 == 0:
            elapsed = time.monotonic() - started
            log(
                f"unet step {step + 1}/{recipe.unet_steps}: loss {running / 100:.4f} "
                f"({elapsed:.0f} s, {elapsed / (step + 1) * (recipe.unet_steps - step - 1):.0f} s left)"
            )
            running = 0.0
        if on_checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < recipe.unet_steps:
            on_checkpoint(step + 1, _with_ema(unet, ema))
    unet.eval()
    return _with_ema(unet, ema)


def _with_ema(unet, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(unet.state_dict())
    state.update({name: average.clone() for (name, _), average in zip(unet.named_parameters(), ema)})
    return state


def pretrain_toy_model(
    out_path: Path, recipe: ToyRecipe, command: str, log: Log = print, device: torch.device | str = "cpu"
):
    """Run the whole recipe and write the fp16 weights file; returns the trained pipeline (fp32, on the CPU).

    On a GPU it takes minutes instead of about 45; every random draw still comes from the same CPU
    generator, but the arithmetic differs in the last bits, so the weights are close, not identical.
    """
    device = torch.device(device)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.monotonic()
    pipe = build_toy_pipeline(seed=recipe.seed)
    for frozen in (pipe.text_encoder, pipe.text_encoder_2):
        frozen.requires_grad_(False)
        scale_word_embeddings(frozen, recipe.text_embedding_scale)
    pipe.to(device)
    pixels, captions = draw_pictures(recipe.pictures, recipe.seed)
    pixels = pixels.to(device)
    log(f"drew {len(pixels)} pictures, {len(set(captions))} distinct captions ({time.monotonic() - started:.0f} s)")
    train_vae(pipe.vae, pixels, recipe, generator, log)
    means, stds = encode_pictures(pipe.vae, pixels)
    unit_noise = torch.randn(means.shape, generator=generator).to(device)
    scaling_factor = float(1.0 / (means + stds * unit_noise).std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    log(f"encoded the pictures; latent scaling factor {scaling_factor:.5f}")
    unique, prompt_embeds, pooled_embeds = encode_caption_table(pipe, captions)
    row_of = {caption: row for row, caption in enumerate(unique)}
    caption_index = torch.tensor([row_of[caption] for caption in captions], device=device)
    metadata = {
        **asdict(recipe),
        "vae_scaling_factor": scaling_factor,
        "command": command,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }

    def keep_partial(step: int, ema_state: dict[str, torch.Tensor]) -> None:
        """A crash late in the run still leaves a usable model, marked partial."""
        partial = copy.deepcopy(pipe)
        partial.unet.load_state_dict(ema_state)
        write_toy_weights(partial, out_path.with_suffix(".partial.safetensors"), {**metadata, "unet_steps_done": step})

    ema_state = train_unet(
        pipe.unet,
        (means, stds),
        scaling_factor,
        caption_index,
        (prompt_embeds, pooled_embeds),
        recipe,
        generator,
        log,
        on_checkpoint=keep_partial,
    )
    pipe.unet.load_state_dict(ema_state)
    pipe.to("cpu")
    minutes = (time.monotonic() - started) / 60
    write_toy_weights(pipe, out_path, {**metadata, "minutes": round(minutes, 1)})
    out_path.with_suffix(".partial.safetensors").unlink(missing_ok=True)
    log(f"wrote {out_path} after {minutes:.1f} min")
    return pipe


def scale_word_embeddings(text_encoder, scale: float) -> None:
    """Multiply a CLIP text encoder's token and position embeddings (see ToyRecipe.text_embedding_scale)."""
    # transformers 5 nests the position table under text_model in one CLIP class and not in the other.
    positions = next(module for name, module in text_encoder.named_modules() if name.endswith("position_embedding"))
    embeddings = text_encoder.get_input_embeddings(), positions
    with torch.no_grad():
        for table in embeddings:
            table.weight.mul_(scale)


def write_toy_weights(pipe, out_path: Path, metadata: dict) -> None:
    """All four networks in one fp16 safetensors file, keys prefixed by component, recipe in the metadata."""
    tensors = {
        f"{name}.{key}": value.detach().to("cpu", torch.float16).contiguous()
        for name in COMPONENTS
        for key, value in getattr(pipe, name).state_dict().items()
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata={"dora_studio.toy_recipe": json.dumps(metadata, sort_keys=True)})


def quick_recipe(recipe: ToyRecipe) -> ToyRecipe:
    """A few steps of everything: for tests of the recipe's plumbing, not a usable model."""
    return replace(recipe, pictures=64, vae_steps=2, vae_batch_size=4, unet_steps=2, unet_batch_size=4, warmup_steps=1)
