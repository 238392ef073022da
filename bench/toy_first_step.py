"""Does the toy model read position words? Where its first sampling step puts the shape, per position word.

At the first sampling step (pure noise: the toy model's schedule has zero terminal SNR) the noise says
nothing about the picture, so a model that reads its caption predicts the caption's average picture: a
shape in the named third. This decodes that prediction (guidance 5, as sampling does) for one caption in
each of the 9 positions and a few noise seeds, and reports where its ink's centroid lands. If the model
reads position words, the centroids follow the words; if it places the shape from the noise, they follow
the seed. Cheaper and steadier than reading finished samples (``bench/toy_accuracy.py``): one UNet call
per caption and seed.

    python bench/toy_first_step.py [--weights FILE] [--seeds 4]
    python bench/toy_first_step.py --caption "a small blue square on a dark grey background, {position}" \
        --background "dark grey"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.builtin.shapes import BACKGROUNDS, Scene
from trainer.builtin.toy import TOY_ASSET, TOY_RESOLUTION, load_toy_pipeline

POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
DEFAULT_CAPTION = "a large red circle on a white background, {position}"


def ink_centroid(image: Image.Image, background: str) -> tuple[float, float]:
    """The centroid (x, y, in pixels) of everything drawn on the background, weighted by how far each
    pixel's colour is from the background's: a blurry prediction still has a centre."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    ink = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], np.float32), axis=-1)
    total = float(ink.sum())
    if total == 0.0:
        return image.width / 2, image.height / 2
    ys, xs = np.mgrid[0 : image.height, 0 : image.width] + 0.5  # pixel centres, in the drawing's coordinates
    return float((ink * xs).sum()) / total, float((ink * ys).sum()) / total


def third_of(centre: tuple[float, float], size: tuple[int, int]) -> str:
    """The position words for a centre, as the captions name them ("top left", "centre", "bottom", ...)."""
    return Scene(size, "circle", "red", "white", "small", centre, 1.0).position


@torch.no_grad()
def first_step_pictures(pipe, captions: list[str], seed: int, guidance: float = 5.0) -> list[Image.Image]:
    """Each caption's guided prediction of the clean picture at the first of 20 sampling steps, decoded,
    all from one seed's starting noise."""
    pipe.scheduler.set_timesteps(20)
    timestep = pipe.scheduler.timesteps[0]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(captions, device="cpu")
    side = TOY_RESOLUTION // pipe.vae_scale_factor
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(seed))
    latents = (noise * pipe.scheduler.init_noise_sigma).expand(len(captions), -1, -1, -1)
    time_ids = torch.tensor(
        [[TOY_RESOLUTION, TOY_RESOLUTION, 0, 0, TOY_RESOLUTION, TOY_RESOLUTION]], dtype=embeds.dtype
    )
    model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
    prediction = pipe.unet(
        model_input,
        timestep,
        torch.cat([negative, embeds]),
        added_cond_kwargs={
            "text_embeds": torch.cat([negative_pooled, pooled]),
            "time_ids": time_ids.expand(2 * len(captions), -1),
        },
    ).sample
    unconditional, conditional = prediction.chunk(2)
    guided = unconditional + guidance * (conditional - unconditional)
    clean = pipe.scheduler.step(guided, timestep, latents).pred_original_sample
    pipe.scheduler.set_timesteps(20)  # step() advanced the scheduler's index; leave it as found
    pictures = pipe.vae.decode(clean / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pictures, output_type="pil")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=TOY_ASSET, help="toy weights (default: the packaged model)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--caption", default=DEFAULT_CAPTION, help="a caption with {position} where its place goes")
    parser.add_argument("--background", default="white", help="the caption's background (the ink is read against it)")
    args = parser.parse_args(argv)
    pipe = load_toy_pipeline(args.weights)
    captions = [args.caption.format(position=position) for position in POSITIONS]
    size = (TOY_RESOLUTION, TOY_RESOLUTION)
    centres = {
        seed: [ink_centroid(picture, args.background) for picture in first_step_pictures(pipe, captions, seed)]
        for seed in range(args.seeds)
    }
    right = sum(third_of(centre, size) == word for row in centres.values() for word, centre in zip(POSITIONS, row))
    print(f"{'position word':<14}" + "".join(f"  seed {seed} (x, y)" for seed in centres))
    for index, word in enumerate(POSITIONS):
        print(f"{word:<14}" + "".join(f"  {row[index][0]:6.1f} {row[index][1]:6.1f} " for row in centres.values()))

    def spread(points: list[tuple[float, float]]) -> float:
        """Mean distance of the points from their mean, in pixels."""
        mean = np.mean(points, axis=0)
        return float(np.mean([np.linalg.norm(np.subtract(point, mean)) for point in points]))

    across_words = statistics.mean(spread(row) for row in centres.values())
    across_seeds = statistics.mean(spread([row[index] for row in centres.values()]) for index in range(len(POSITIONS)))
    total = len(POSITIONS) * len(centres)
    print(
        f"the shape moves {across_words:.1f} px between position words (one noise), {across_seeds:.1f} px between seeds"
    )
    print(f"centroid in the named third: {right} of {total} (chance: 1 in 9)")
    print(
        json.dumps({"across_words_px": across_words, "across_seeds_px": across_seeds, "in_named_third": right / total})
    )


if __name__ == "__main__":
    main()
