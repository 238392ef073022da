"""Draw the README's pictures: what ``builtin:toy-sdxl`` draws, and what the quick start taught it.

    python bench/readme_images.py                      # writes docs/toy-sdxl-samples.png
    python bench/readme_images.py --run RUN_DIR        # also docs/quickstart-before-after.png from a quick start
    python bench/readme_images.py --run RUN_DIR --read-only   # only print what each sample of the run draws

The first grid samples the toy model (20 Euler steps, guidance 5, seeds 0 and 1) from captions of the kind
it was pretrained on, one row per caption. The second lays out a finished run's per-epoch samples, one row
per sample prompt, from the base model (epoch 0) to the last epoch, and prints what the exact reader
(``quality_metrics.read_picture``) sees in each of its samples: which shape, the ``zqx`` ring included.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
TOY_PROMPTS = (
    "a large red circle on a white background, centre",
    "a small blue square on a pale yellow background, top left",
    "a large green triangle on a light grey background, bottom right",
    "a small purple diamond on a pale green background, top",
    "a large yellow square on a dark grey background, left",
    "a small orange circle on a pale blue background, bottom left",
)
SCALE = 2  # 128 px pictures shown at 256 px, nearest-neighbour, so the pixels stay honest


def label_grid(
    rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str], scale: int = SCALE
) -> Image.Image:
    """Pictures in a grid, upscaled, with a label above each column and each row's label to its left."""
    font = ImageFont.load_default(size=14)
    side = rows[0][0].width * scale
    label_width, header = 330, 24
    grid = Image.new("RGB", (label_width + side * len(column_labels), header + side * len(rows)), "white")
    pen = ImageDraw.Draw(grid)
    for column, text in enumerate(column_labels):
        pen.text((label_width + column * side + 6, 4), text, fill="black", font=font)
    for row, (images, text) in enumerate(zip(rows, row_labels)):
        top = header + row * side
        pen.multiline_text((6, top + side // 2 - 20), _wrap(text, 40), fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (label_width + column * side, top))
    return grid


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def toy_samples(out: Path) -> None:
    from trainer.builtin.resolve import resolve_builtin
    from trainer.sdxl.model_files import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(resolve_builtin("builtin:toy-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    seeds = (0, 1)
    rows = [
        [
            pipe(
                prompt=prompt,
                num_inference_steps=20,
                guidance_scale=5.0,
                height=128,
                width=128,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            for seed in seeds
        ]
        for prompt in TOY_PROMPTS
    ]
    label_grid(rows, list(TOY_PROMPTS), [f"seed {seed}" for seed in seeds]).save(out)


def run_samples(run_dir: Path) -> tuple[list[str], list[str], list[list[Image.Image]]]:
    """(prompts, column labels, one row of pictures per prompt: samples/epoch_000 to the last epoch)."""
    epochs = sorted(run_dir.glob("samples/epoch_*"))
    if not epochs:
        raise SystemExit(f"{run_dir}: no samples/epoch_NNN folders; is it a finished run with sampling.at_start?")
    prompts = json.loads((epochs[0] / "prompts.json").read_text(encoding="utf-8"))
    rows = [[Image.open(folder / record["file"]).convert("RGB") for folder in epochs] for record in prompts]
    columns = ["base" if folder.name == "epoch_000" else f"epoch {int(folder.name[6:])}" for folder in epochs]
    return [record["prompt"] for record in prompts], columns, rows


def quickstart_grid(run_dir: Path, out: Path) -> None:
    """Rows: the run's sample prompts; columns: samples/epoch_000 (the base model) to the last epoch."""
    prompts, columns, rows = run_samples(run_dir)
    label_grid(rows, prompts, columns, scale=1).save(out)


def print_readings(run_dir: Path) -> None:
    """What each sample draws, read exactly against the background its prompt names."""
    from quality_metrics import read_picture

    prompts, columns, rows = run_samples(run_dir)
    for prompt, pictures in zip(prompts, rows):
        background = re.search(r"on an? (.+?) background", prompt)
        if background is None:
            print(f"{prompt}: names no background, not read")
            continue
        readings = [read_picture(picture, background.group(1)) for picture in pictures]
        print(prompt)
        print("  " + ", ".join(f"{column}: {reading.shape}" for column, reading in zip(columns, readings)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--run", type=Path, help="a finished quick-start run folder: draw its before/after grid")
    parser.add_argument("--read-only", action="store_true", help="with --run: print its readings, draw nothing")
    args = parser.parse_args(argv)
    if args.run:
        print_readings(args.run)
    if args.read_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    toy_samples(args.out / "toy-sdxl-samples.png")
    print(f"wrote {args.out / 'toy-sdxl-samples.png'}")
    if args.run:
        quickstart_grid(args.run, args.out / "quickstart-before-after.png")
        print(f"wrote {args.out / 'quickstart-before-after.png'}")


if __name__ == "__main__":
    main()
