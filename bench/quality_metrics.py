"""The measures ``bench/quality.py`` reports, as pure functions so tests can check them.

Concept score: the toy model draws flat shapes on plain backgrounds, so what a sample drew can be read
off exactly, without a learned checker. The foreground is every pixel far from the prompted background
colour; each candidate shape's silhouette is drawn at the foreground's centroid with the foreground's
area; the drawing "is" the shape whose silhouette overlaps it best (intersection over union). The score
of a sample is its concept margin (IoU with the zqx ring minus the best IoU of a plain shape), and
whether the ring beat every plain shape.

Weight decomposition (DoRA paper, section 3, figure 2): ``trainer.adapters.decomposition``, which
``dora-studio analyze`` shares; imported here for ``bench/quality.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trainer.adapters.decomposition import decomposition_change as decomposition_change
from trainer.adapters.decomposition import slope_and_correlation as slope_and_correlation
from trainer.builtin.shapes import BACKGROUNDS, COLOURS, CONCEPT_SHAPE, PLAIN_SHAPES, Scene, silhouette

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour that counts as drawn on
CANDIDATES = (CONCEPT_SHAPE, *PLAIN_SHAPES)
# Area of each silhouette per radius squared, so a silhouette can be sized to the drawing's area.
_AREA_PER_RADIUS2 = {
    shape: np.count_nonzero(np.asarray(silhouette(shape, (400, 400), (200, 200), 100.0))) / 1e4 for shape in CANDIDATES
}


@dataclass(frozen=True)
class ShapeMatch:
    iou: dict[str, float]  # by candidate shape; all 0 when nothing was drawn
    best: str | None  # None when nothing was drawn

    @property
    def concept_iou(self) -> float:
        return self.iou[CONCEPT_SHAPE]

    @property
    def concept_margin(self) -> float:
        """The ring's IoU minus the best plain shape's: above 0, the drawing is more ring than anything else.

        Raw IoU flatters blobs (a ring sized and centred like a blob overlaps most of it); the margin does not.
        """
        return self.concept_iou - max(self.iou[shape] for shape in PLAIN_SHAPES)


def foreground(image: Image.Image, background: str) -> np.ndarray:
    """Pixels that differ from the named background colour (bool [H, W])."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], np.float32), axis=-1) > FOREGROUND_DISTANCE


def match_shape(image: Image.Image, background: str) -> ShapeMatch:
    """Which silhouette, centred and sized like the drawing, covers it best."""
    drawn = foreground(image, background)
    area = int(drawn.sum())
    if area == 0:
        return ShapeMatch({shape: 0.0 for shape in CANDIDATES}, None)
    rows, columns = np.nonzero(drawn)
    centre = (float(columns.mean()) + 0.5, float(rows.mean()) + 0.5)
    iou = {}
    for shape in CANDIDATES:
        radius = math.sqrt(area / _AREA_PER_RADIUS2[shape])
        template = np.asarray(silhouette(shape, image.size, centre, radius)) > 0
        iou[shape] = float((drawn & template).sum() / (drawn | template).sum())
    return ShapeMatch(iou, max(iou, key=iou.get))


@dataclass(frozen=True)
class Reading:
    """What a picture shows, in caption words (None where nothing was drawn)."""

    shape: str | None
    colour: str | None
    position: str | None


# Each named colour and a shade of it at half brightness: a model that draws a colour too dark still drew it.
_SHADES = [(name, np.asarray(rgb, np.float32)) for name, rgb in COLOURS.items()]
_SHADES += [(name, np.asarray([channel // 2 for channel in rgb], np.float32)) for name, rgb in COLOURS.items()]


def _majority_colour(pixels: np.ndarray) -> str:
    """The named colour most foreground pixels lie nearest to (either shade of it)."""
    distances = np.stack([np.linalg.norm(pixels - rgb, axis=-1) for _, rgb in _SHADES])
    votes = np.bincount(distances.argmin(axis=0) % len(COLOURS), minlength=len(COLOURS))
    return list(COLOURS)[int(votes.argmax())]


def read_picture(image: Image.Image, background: str, shapes: tuple[str, ...] = CANDIDATES) -> Reading:
    """The drawn shape (best silhouette), its colour (the named colour most foreground pixels are nearest)
    and its position (the third its centroid lies in, worded as captions word it)."""
    drawn = foreground(image, background)
    if not drawn.any():
        return Reading(None, None, None)
    match = match_shape(image, background)
    best = max(shapes, key=match.iou.get)
    colour = _majority_colour(np.asarray(image.convert("RGB"), dtype=np.float32)[drawn])
    rows, columns = np.nonzero(drawn)
    centre = (float(columns.mean()) + 0.5, float(rows.mean()) + 0.5)
    position = Scene(image.size, best, colour, background, "small", centre, 1.0).position
    return Reading(best, colour, position)
