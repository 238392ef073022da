"""Captioned pictures of flat shapes: the drawing vocabulary of the example dataset and the toy model.

One ``Scene`` is one shape on a plain background. Its caption is built from the very numbers the drawing
uses, so a caption always says what is in the picture. ``datasets_example/make_dataset.py`` draws the
``zqx`` concept with it; ``trainer.builtin.toy_pretrain`` draws the toy model's pretraining pictures (never a zqx).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # drawn at 4x, then downscaled with LANCZOS: anti-aliased edges
# The example dataset's new concept, a ring, named by a made-up word the toy model never saw: the caption
# names it where a shape goes ("a large red zqx on a white background, centre"), as DreamBooth's "a sks dog".
TRIGGER = "zqx"
CONCEPT_SHAPE = TRIGGER
RING_HOLE = 0.5  # the hole's radius over the ring's: wide enough to show at the toy model's 16x16 latents

COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 200, 30),
    "green": (40, 150, 60),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (235, 110, 165),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "pale blue": (200, 225, 250),
    "pale yellow": (250, 245, 200),
    "pale green": (210, 240, 210),
    "pale pink": (250, 215, 225),
    "light grey": (205, 205, 205),
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

    @property
    def position(self) -> str:
        """The caption's position words: "centre", "top left", "bottom", ..."""
        x, y = self.centre
        width, height = self.size
        row, column = ROWS[int(3 * y / height)], COLUMNS[int(3 * x / width)]
        return {("middle", "centre"): "centre"}.get((row, column)) or " ".join(
            word for word in (row, column) if word not in ("middle", "centre")
        )

    @property
    def caption(self) -> str:
        return f"a {self.size_word} {self.colour} {self.shape} on a {self.background} background, {self.position}"


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


def _regular_polygon(cx: float, cy: float, radius: float, angles: tuple[float, ...]) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]


def _fill_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float) -> None:
    """One shape's silhouette on a mask: 255 inside, holes 0."""
    fill = 255
    if shape in (CONCEPT_SHAPE, "circle"):
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        if shape == CONCEPT_SHAPE:  # a ring: the circle with a round hole
            hole = radius * RING_HOLE
            pen.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    elif shape == "square":
        half = radius * 0.85  # about the circle's area, so "small" and "large" mean the same for both
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":  # upright and equilateral, centred on its centroid
        pen.polygon(_regular_polygon(cx, cy, radius, (-90, 30, 150)), fill=fill)
    elif shape == "diamond":  # a square on its corner
        pen.polygon(_regular_polygon(cx, cy, radius, (-90, 0, 90, 180)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {CONCEPT_SHAPE!r}, {', '.join(PLAIN_SHAPES)}")


def _supersampled_mask(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float) -> Image.Image:
    scale = SUPERSAMPLE
    mask = Image.new("L", (size[0] * scale, size[1] * scale), 0)
    _fill_shape(ImageDraw.Draw(mask), shape, centre[0] * scale, centre[1] * scale, radius * scale)
    return mask


def paint(scene: Scene) -> Image.Image:
    """The scene's picture, anti-aliased."""
    mask = _supersampled_mask(scene.shape, scene.size, scene.centre, scene.radius)
    image = Image.new("RGB", mask.size, BACKGROUNDS[scene.background])
    image.paste(COLOURS[scene.colour], mask=mask)
    return image.resize(scene.size, Image.Resampling.LANCZOS)


def silhouette(shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float) -> Image.Image:
    """The shape's mask ("L", 0 or 255) at output size: what a picture of it covers, for scoring drawings."""
    mask = _supersampled_mask(shape, size, centre, radius)
    return mask.resize(size, Image.Resampling.BOX).point(lambda value: 255 if value >= 128 else 0)
