"""Captioned pictures of flat shapes: the drawing vocabulary of the example dataset and the toy model.

One ``Scene`` is one shape on a plain background. Its caption is built from the very numbers the drawing
uses, so a caption always says what is in the picture. ``datasets_example/make_dataset.py`` draws the
``zqx`` concept with it; ``trainer.toy_data`` draws the toy model's pretraining pictures (never a star).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # drawn at 4x, then downscaled with LANCZOS: anti-aliased edges
TRIGGER = "zqx"
CONCEPT_SHAPE = "zqx star"  # the example dataset's new concept; the toy model never sees it

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
PLAIN_SHAPES = ("circle", "square", "triangle", "diamond")


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # (width, height) in output pixels
    shape: str  # CONCEPT_SHAPE or one of PLAIN_SHAPES
    colour: str
    background: str
    size_word: str
    centre: tuple[float, float]  # in output pixels
    radius: float  # in output pixels
    rotation: float = 0.0  # degrees; stars only

    @property
    def position(self) -> str:
        """The caption's position words: "centre", "top left", "bottom", ..."""
        x, y = self.centre
        width, height = self.size
        row, column = ROWS[int(3 * y / height)], COLUMNS[int(3 * x / width)]
        return {("middle", "centre"): "centre"}.get((row, column)) or " ".join(
            word for word in (row, column) if word not in ("middle", "centre"))

    @property
    def caption(self) -> str:
        body = f"a {self.size_word} {self.colour} {self.shape} on a {self.background} background, {self.position}"
        return f"{TRIGGER}, {body}" if self.shape.startswith(TRIGGER) else body


def _luminance(rgb: tuple[int, int, int]) -> float:
    red, green, blue = rgb
    return 0.299 * red + 0.587 * green + 0.114 * blue


def readable(colour: str, background: str) -> bool:
    """A shape must stand out from its background, or its caption describes something barely visible."""
    contrast = abs(_luminance(COLOURS[colour]) - _luminance(BACKGROUNDS[background]))
    return colour not in background and contrast >= 60


def place_centre(
    rng: random.Random, size: tuple[int, int], cell: tuple[int, int], radius: float
) -> tuple[float, float]:
    """A centre inside grid cell (row, column) of the 3x3 thirds, with the whole shape inside the image.

    So the caption's position is true. Draws x, then y.
    """
    width, height = size
    centre = []
    for index, extent in ((cell[1], width), (cell[0], height)):
        start = max(extent * index / 3, radius + EDGE_MARGIN)
        stop = min(extent * (index + 1) / 3, extent - radius - EDGE_MARGIN) - 0.5
        if start >= stop:
            raise ValueError(f"a radius of {radius:.1f} px does not fit cell {cell} of a {width}x{height} image")
        centre.append(rng.uniform(start, stop))
    return centre[0], centre[1]


def star_points(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star, first point up (turned by ``rotation`` degrees)."""
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


def _regular_polygon(cx: float, cy: float, radius: float, angles: tuple[float, ...]) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]


def _paint(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, rotation: float,
           fill) -> None:
    """One shape's silhouette, in ``fill``."""
    if shape == CONCEPT_SHAPE:
        pen.polygon(star_points(cx, cy, radius, rotation), fill=fill)
    elif shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.85  # about the circle's area, so "small" and "large" mean the same for both
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":  # upright and equilateral, centred on its centroid
        pen.polygon(_regular_polygon(cx, cy, radius, (-90, 30, 150)), fill=fill)
    elif shape == "diamond":  # a square on its corner
        pen.polygon(_regular_polygon(cx, cy, radius, (-90, 0, 90, 180)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {CONCEPT_SHAPE!r}, {', '.join(PLAIN_SHAPES)}")


def draw(scene: Scene) -> Image.Image:
    """The scene's picture, anti-aliased."""
    scale = SUPERSAMPLE
    big = (scene.size[0] * scale, scene.size[1] * scale)
    cx, cy, radius = scene.centre[0] * scale, scene.centre[1] * scale, scene.radius * scale
    image = Image.new("RGB", big, BACKGROUNDS[scene.background])
    colour = COLOURS[scene.colour]
    if scene.shape == CONCEPT_SHAPE:
        mask = Image.new("L", big, 0)
        _paint(ImageDraw.Draw(mask), scene.shape, cx, cy, radius, scene.rotation, 255)
        image.paste(_zigzag_stripes(big, cy - radius, colour, radius), mask=mask)
    else:
        _paint(ImageDraw.Draw(image), scene.shape, cx, cy, radius, scene.rotation, colour)
    return image.resize(scene.size, Image.Resampling.LANCZOS)


def silhouette(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float,
               rotation: float = 0.0) -> Image.Image:
    """The shape's mask ("L", 0 or 255) at output size: what a picture of it covers, for scoring drawings."""
    scale = SUPERSAMPLE
    mask = Image.new("L", (size[0] * scale, size[1] * scale), 0)
    _paint(ImageDraw.Draw(mask), shape, centre[0] * scale, centre[1] * scale, radius * scale, rotation, 255)
    return mask.resize(size, Image.Resampling.BOX).point(lambda value: 255 if value >= 128 else 0)
