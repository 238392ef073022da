"""Draw the example dataset: a made-up concept, ``zqx``, and a few ordinary shapes, in kohya's folder layout.

``zqx`` is a five-pointed star filled with horizontal zig-zag stripes (the named colour alternating with a
darker shade of it): a shape and a texture no base model knows, so a trained adapter visibly learned it.
``1_shapes`` holds plain circles, squares and triangles as regularisation-style images.

Everything comes from one seeded ``random.Random``, so a rerun draws the same pixels and captions. Every
caption is built from the same numbers the drawing used, so it says what is in the picture.

    python datasets_example/make_dataset.py [OUT_DIR]    # OUT_DIR defaults to this script's folder
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20240611
SUPERSAMPLE = 4  # drawn at 4x, then downscaled with LANCZOS: anti-aliased edges
TRIGGER = "zqx"
CONCEPT_FOLDER = "10_zqxstar"  # 10 repeats
SHAPES_FOLDER = "1_shapes"  # 1 repeat
JPEG_QUALITY = 90

COLOURS = {
    "red": (215, 40, 40), "orange": (240, 135, 25), "yellow": (235, 200, 30), "green": (40, 150, 60),
    "blue": (40, 80, 200), "purple": (130, 60, 170), "pink": (235, 110, 165),
}
BACKGROUNDS = {
    "white": (255, 255, 255), "pale blue": (200, 225, 250), "pale yellow": (250, 245, 200),
    "pale green": (210, 240, 210), "pale pink": (250, 215, 225), "light grey": (205, 205, 205),
    "dark grey": (70, 70, 70),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
# The shape's radius as a fraction of the image's short side. The gap between the two ranges keeps
# "small" and "large" unambiguous; the large maximum still lets a shape's centre sit in a corner third.
SIZES = {"small": (0.15, 0.19), "large": (0.24, 0.28)}
EDGE_MARGIN = 2  # px kept free between a shape and the image border

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
    size: tuple[int, int]
    shape: str  # "zqx star", "circle", "square" or "triangle"
    colour: str
    background: str
    size_word: str
    centre: tuple[float, float]  # in output pixels
    radius: float  # in output pixels
    rotation: float  # degrees; stars only

    @property
    def caption(self) -> str:
        x, y = self.centre
        width, height = self.size
        row, column = ROWS[int(3 * y / height)], COLUMNS[int(3 * x / width)]
        position = {("middle", "centre"): "centre"}.get((row, column)) or " ".join(
            word for word in (row, column) if word not in ("middle", "centre"))
        body = f"a {self.size_word} {self.colour} {self.shape} on a {self.background} background, {position}"
        return f"{TRIGGER}, {body}" if self.shape.startswith(TRIGGER) else body


def _luminance(rgb: tuple[int, int, int]) -> float:
    red, green, blue = rgb
    return 0.299 * red + 0.587 * green + 0.114 * blue


def _readable(colour: str, background: str) -> bool:
    """A shape must stand out from its background, or its caption describes something barely visible."""
    contrast = abs(_luminance(COLOURS[colour]) - _luminance(BACKGROUNDS[background]))
    return colour not in background and contrast >= 60


def _plan_one(rng: random.Random, file_name: str, extension: str, size: tuple[int, int], shape: str,
              colour: str, cell: tuple[int, int], size_word: str, backgrounds_used: Counter[str]) -> Drawing:
    readable = [name for name in BACKGROUNDS if _readable(colour, name)]
    fewest = min(backgrounds_used[name] for name in readable)  # spread the backgrounds evenly
    background = rng.choice([name for name in readable if backgrounds_used[name] == fewest])
    backgrounds_used[background] += 1
    low, high = SIZES[size_word]
    width, height = size
    radius = min(size) * rng.uniform(low, high)
    centre = []
    for index, extent in ((cell[1], width), (cell[0], height)):
        # the centre lies inside its third (so the caption's position is true) and the shape inside the image
        start = max(extent * index / 3, radius + EDGE_MARGIN)
        stop = min(extent * (index + 1) / 3, extent - radius - EDGE_MARGIN) - 0.5
        assert start < stop, (file_name, size, radius)
        centre.append(rng.uniform(start, stop))
    rotation = rng.uniform(-12.0, 12.0) if shape == "zqx star" else 0.0
    return Drawing(file_name, extension, size, shape, colour, background, size_word, (centre[0], centre[1]),
                   radius, rotation)


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
        (CONCEPT_FOLDER, CONCEPT_COUNT, "zqx", ["zqx star"], CONCEPT_SIZES),
        (SHAPES_FOLDER, SHAPE_COUNT, "shape", ["circle", "square", "triangle"], SHAPE_SIZES),
    ):
        colours, positions = _spread(rng, list(COLOURS), count), _spread(rng, cells, count)
        size_words, shape_names = _spread(rng, sorted(SIZES), count), _spread(rng, shapes, count)
        backgrounds_used: Counter[str] = Counter()
        drawings[folder] = [
            _plan_one(rng, f"{prefix}_{index:02d}", ".jpg" if folder == CONCEPT_FOLDER and index == JPEG_INDEX
                      else ".png", sizes.get(index, (128, 128)), shape_names[index], colours[index],
                      positions[index], size_words[index], backgrounds_used)
            for index in range(count)
        ]
    return drawings


def _star_points(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    inner = radius * 0.4  # 0.382 is the regular pentagram; a touch fatter leaves room for the stripes
    points = []
    for k in range(10):
        angle = math.radians(-90 + rotation + 36 * k)
        r = radius if k % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _zigzag_stripes(size: tuple[int, int], top: float, colour: tuple[int, int, int], radius: float) -> Image.Image:
    """Horizontal zig-zag bands of ``colour`` on a darker shade of it, starting at the star's top point,
    scaled with the star so every zqx star carries about the same number of stripes."""
    dark = tuple(channel // 2 for channel in colour)
    stripes = Image.new("RGB", size, dark)
    draw = ImageDraw.Draw(stripes)
    period = radius / 3.5  # one light and one dark band
    half_wave, amplitude = period * 0.6, period * 0.35
    xs = [step * half_wave for step in range(int(size[0] / half_wave) + 2)]
    band_top = top - period
    while band_top < size[1]:
        upper = [(x, band_top + amplitude * (step % 2)) for step, x in enumerate(xs)]
        lower = [(x, y + period / 2) for x, y in reversed(upper)]
        draw.polygon(upper + lower, fill=colour)
        band_top += period
    return stripes


def draw(drawing: Drawing) -> Image.Image:
    scale = SUPERSAMPLE
    big = (drawing.size[0] * scale, drawing.size[1] * scale)
    cx, cy, radius = drawing.centre[0] * scale, drawing.centre[1] * scale, drawing.radius * scale
    image = Image.new("RGB", big, BACKGROUNDS[drawing.background])
    colour = COLOURS[drawing.colour]
    if drawing.shape == "zqx star":
        mask = Image.new("L", big, 0)
        ImageDraw.Draw(mask).polygon(_star_points(cx, cy, radius, drawing.rotation), fill=255)
        image.paste(_zigzag_stripes(big, cy - radius, colour, radius), mask=mask)
    else:
        pen = ImageDraw.Draw(image)
        if drawing.shape == "circle":
            pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        elif drawing.shape == "square":
            half = radius * 0.85  # about the circle's area, so "small" and "large" mean the same for both
            pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
        else:  # an upright equilateral triangle centred on its centroid
            pen.polygon([(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a)))
                         for a in (-90, 30, 150)], fill=colour)
    return image.resize(drawing.size, Image.Resampling.LANCZOS)


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
                draw(drawing).save(image_path, format="JPEG", quality=JPEG_QUALITY)
            else:
                draw(drawing).save(image_path, format="PNG", optimize=True)
            caption_path.write_text(drawing.caption + "\n", encoding="utf-8", newline="\n")
            wanted |= {image_path.name, caption_path.name}
            written += [image_path, caption_path]
        for stray in folder.iterdir():
            if stray.is_file() and GENERATED_NAME.match(stray.name) and stray.name not in wanted:
                stray.unlink()
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write 10_zqxstar/ and 1_shapes/ into (default: this script's folder)")
    args = parser.parse_args(argv)
    written = write_dataset(args.out_dir)
    print(f"wrote {len(written)} files under {args.out_dir}")


if __name__ == "__main__":
    main()
