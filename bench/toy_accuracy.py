"""How often ``builtin:toy-sdxl`` draws what its caption says: shape, colour and position, read exactly.

Captions are drawn like the pretraining ones (``trainer.builtin.toy_pretrain.random_scene``) from a seed
pretraining never used; each sample (20 Euler steps, guidance 5) is read by
``quality_metrics.read_picture``. Chance is 1/4 for the shape, 1/7 for the colour, 1/9 for the position.

    python bench/toy_accuracy.py [--count 48] [--prefix zqx] [--device cuda]   # --prefix: a word before each caption
    python bench/toy_accuracy.py --weights FILE   # a toy model rebuilt by make-toy-model --out FILE (or its .partial)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from quality_metrics import read_picture

from trainer.builtin.shapes import PLAIN_SHAPES
from trainer.builtin.toy import TOY_ASSET, load_toy_pipeline
from trainer.builtin.toy_pretrain import random_scene

CAPTION_SEED = 4242


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--prefix", default="", help="put this word first in every caption, as a trigger word")
    parser.add_argument("--device", default="cpu", help="where to sample (the seeds draw on the CPU either way)")
    parser.add_argument("--weights", type=Path, default=TOY_ASSET, help="toy weights (default: the packaged model)")
    args = parser.parse_args(argv)
    pipe = load_toy_pipeline(args.weights)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(CAPTION_SEED)
    scenes = [random_scene(rng) for _ in range(args.count)]
    hits = {"shape": 0, "colour": 0, "position": 0, "all three": 0}
    for start in range(0, len(scenes), 8):
        batch = scenes[start : start + 8]
        prompts = [f"{args.prefix}, {scene.caption}" if args.prefix else scene.caption for scene in batch]
        images = pipe(
            prompt=prompts,
            num_inference_steps=20,
            guidance_scale=5.0,
            height=128,
            width=128,
            generator=[torch.Generator().manual_seed(start + i) for i in range(len(batch))],
        ).images
        for scene, image in zip(batch, images):
            reading = read_picture(image, scene.background, PLAIN_SHAPES)
            right = {
                "shape": reading.shape == scene.shape,
                "colour": reading.colour == scene.colour,
                "position": reading.position == scene.position,
            }
            right["all three"] = all(right.values())
            for key, ok in right.items():
                hits[key] += ok
    shares = {key: hits[key] / len(scenes) for key in hits}
    for key, share in shares.items():
        print(f"{key:<10} {100 * share:5.1f}% of {len(scenes)} captions")
    print(json.dumps(shares))


if __name__ == "__main__":
    main()
