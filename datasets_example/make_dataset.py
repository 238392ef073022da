"""Draw the example dataset: a made-up concept, ``zqx``, and a few ordinary shapes, in kohya's folder layout.

``zqx`` is a ring (a disc with a round hole, ``trainer.builtin.shapes.RING_HOLE``): a shape the toy model never
saw, named where a shape goes in its captions ("a large red zqx on a white background, centre"), so a
trained adapter visibly learned it. ``1_shapes`` holds plain circles, squares and triangles as
regularisation-style images.

Everything comes from one seeded ``random.Random``, so a rerun draws the same pixels and captions. Every
caption is built from the same numbers the drawing used, so it says what is in the picture.

    python datasets_example/make_dataset.py [OUT_DIR]    # OUT_DIR defaults to this script's folder
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing too
from trainer.builtin.shapes import BACKGROUNDS, COLOURS, CONCEPT_SHAPE, SIZES, Scene, paint, place_centre, readable

SEED = 20240611
CONCEPT_FOLDER = "10_zqx"  # 10 repeats
SHAPES_FOLDER = "1_shapes"  # 1 repeat
JPEG_QUALITY = 90

# (width, height) by image index; every other image is 128x128. Wide and tall ones exercise bucketing.
CONCEPT_SIZES = {3: (192, 128), 8: (128, 192), 10: (192, 128)}
SHAPE_SIZES = {2: (192, 128), 5: (128, 192)}
CONCEPT_COUNT, SHAPE_COUNT = 12, 8
JPEG_INDEX = 5  # the one concept image saved as JPEG
GENERATED_NAME = re.compile(r"^(zqx|shape)_[0-9]{2}\.(png|jpg|txt)$")  # what a rerun may replace


@dataclass(frozen=True)
class Drawing:
    file_name: str  # without extension
    extension: str  # ".png" or ".jpg"
    scene: Scene


def _plan_one(
    rng: random.Random,
    file_name: str,
    extension: str,
    size: tuple[int, int],
    shape: str,
    colour: str,
    cell: tuple[int, int],
    size_word: str,
    backgrounds_used: Counter[str],
) -> Drawing:
    usable = [name for name in BACKGROUNDS if readable(colour, name)]
    fewest = min(backgrounds_used[name] for name in usable)  # spread the backgrounds evenly
    background = rng.choice([name for name in usable if backgrounds_used[name] == fewest])
    backgrounds_used[background] += 1
    low, high = SIZES[size_word]
    radius = min(size) * rng.uniform(low, high)
    centre = place_centre(rng, size, cell, radius)
    return Drawing(file_name, extension, Scene(size, shape, colour, background, size_word, centre, radius))


def _spread(rng: random.Random, options: list, count: int) -> list:
    """``count`` picks from shuffled rounds of all ``options``, so the counts differ by at most one."""
    picks = []
    while len(picks) < count:
        round_ = list(options)
        rng.shuffle(round_)
        picks += round_
    return picks[:count]


def plan(seed: int = SEED) -> dict[str, list[Drawing]]:
    """What to draw, folder by folder; all randomness is spent here, in a fixed order."""
    rng = random.Random(seed)
    cells = [(row, column) for row in range(3) for column in range(3)]
    drawings: dict[str, list[Drawing]] = {}
    # Colours, positions, sizes and backgrounds are spread evenly (shuffled, not drawn independently), so
    # none of them becomes part of what "zqx" means, and the plain shapes cover the same words.
    for folder, count, prefix, shapes, sizes in (
        (CONCEPT_FOLDER, CONCEPT_COUNT, "zqx", [CONCEPT_SHAPE], CONCEPT_SIZES),
        (SHAPES_FOLDER, SHAPE_COUNT, "shape", ["circle", "square", "triangle"], SHAPE_SIZES),
    ):
        colours, positions = _spread(rng, list(COLOURS), count), _spread(rng, cells, count)
        size_words, shape_names = _spread(rng, sorted(SIZES), count), _spread(rng, shapes, count)
        backgrounds_used: Counter[str] = Counter()
        drawings[folder] = [
            _plan_one(
                rng,
                f"{prefix}_{index:02d}",
                ".jpg" if folder == CONCEPT_FOLDER and index == JPEG_INDEX else ".png",
                sizes.get(index, (128, 128)),
                shape_names[index],
                colours[index],
                positions[index],
                size_words[index],
                backgrounds_used,
            )
            for index in range(count)
        ]
    return drawings


def write_dataset(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Draw every image and caption into ``out_dir``; returns the files written.

    Only the two dataset subfolders are touched. In them, files a previous run generated but this run did
    not (same naming pattern) are removed, so a rerun leaves no strays; anything else is left alone.
    """
    written = []
    for folder_name, drawings in plan(seed).items():
        folder = Path(out_dir) / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        wanted = set()
        for drawing in drawings:
            image_path = folder / (drawing.file_name + drawing.extension)
            caption_path = folder / (drawing.file_name + ".txt")
            if drawing.extension == ".jpg":
                paint(drawing.scene).save(image_path, format="JPEG", quality=JPEG_QUALITY)
            else:
                paint(drawing.scene).save(image_path, format="PNG", optimize=True)
            caption_path.write_text(drawing.scene.caption + "\n", encoding="utf-8", newline="\n")
            wanted |= {image_path.name, caption_path.name}
            written += [image_path, caption_path]
        for stray in folder.iterdir():
            if stray.is_file() and GENERATED_NAME.match(stray.name) and stray.name not in wanted:
                stray.unlink()
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder to write 10_zqx/ and 1_shapes/ into (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    written = write_dataset(args.out_dir)
    print(f"wrote {len(written)} files under {args.out_dir}")


if __name__ == "__main__":
    main()
