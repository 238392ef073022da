"""Read training images the way they look in a viewer: upright, opaque RGB, 8 bits, whatever the file.

Two entry points: ``probe_image`` reads the header and checks what it cheaply can of the data (the dataset
scan calls it on every file), and ``load_image_rgb`` decodes pixels (training calls it). Both refuse
decompression bombs before any pixel is decoded, and both report failures as ``ImageLoadError`` naming the
file, the reason and the fix. Masks for masked loss are read the same way, as 8-bit grey
(``load_mask_image``; ``has_transparency`` tells from the header whether an image's alpha can be one).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainer.errors import ImageLoadError

# Pillow's own DecompressionBombError threshold (2 x MAX_IMAGE_PIXELS = 2 x 89,478,485). Set here rather
# than read from Pillow so another library changing the global cannot change what we accept; images up to
# it (a 12000x12000 scan is 144 MP) open without Pillow's DecompressionBombWarning.
PIXEL_LIMIT = 178_956_970

# Only these parsers run on user files: a .jpg that is really a TIFF or GIF still reads, but no
# rarely-used plugin (EPS, PSD, ...) is ever handed an unknown file. The JPEG parser also yields "MPO".
READABLE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")

# EXIF orientations that turn the stored image a quarter turn, so width and height trade places.
_QUARTER_TURN_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageProbe:
    width: int  # upright, after EXIF orientation
    height: int
    format: str  # what Pillow detected from the content, e.g. "PNG", whatever the extension says


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Open with our pixel limit; header only. Any Pillow failure becomes an ``ImageLoadError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=READABLE_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own guard, at the same limit unless changed globally
        raise _too_large(path) from None
    except FileNotFoundError:
        raise ImageLoadError.at(path, "file not found (moved or deleted while scanning?)") from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise _unreadable(path, error) from None
    with image:
        width, height = image.size
        if width * height > PIXEL_LIMIT:
            raise _too_large(path, f"{width}x{height} = {width * height / 1e6:.0f} MP, ")
        yield image


def _too_large(path: Path, size: str = "") -> ImageLoadError:
    return ImageLoadError.at(
        path,
        f"image too large ({size}over the {PIXEL_LIMIT / 1e6:.0f} megapixel limit that guards "
        "against decompression bombs); downscale it: training resizes to about 1 megapixel anyway",
        kind="too_large",
    )


def _unreadable(path: Path, error: Exception) -> ImageLoadError:
    if path.stat().st_size == 0:
        reason = "the file is empty (0 bytes)"
    else:
        reason = f"{type(error).__name__}: {error}"
    return ImageLoadError.at(path, f"cannot read this image: {reason}; re-export or remove it")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from the header bytes only (``getexif`` on a PNG would decode all pixels)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a damaged EXIF block must not make a readable image unusable
        return 1
    return exif.get(_EXIF_ORIENTATION_TAG, 1)


def probe_image(path: str | Path) -> ImageProbe:
    """Size and detected format; ``verify`` catches broken PNG chunks cheaply, ``_check_jpeg_data`` the
    truncated or garbled JPEGs that would otherwise pass here and stop a run when training loads them."""
    path = Path(path)
    with _open(path) as image:
        width, height = image.size
        if _orientation(image) in _QUARTER_TURN_ORIENTATIONS:
            width, height = height, width
        detected = image.format or "unknown"
        try:
            image.verify()
        except Exception as error:  # verify raises anything from struct.error to SyntaxError
            raise _unreadable(path, error) from None
    if detected in {"JPEG", "MPO"}:
        _check_jpeg_data(path)
    return ImageProbe(width, height, detected)


def _check_jpeg_data(path: Path) -> None:
    """Decode at 1/8 scale: JPEG has no checksum and Pillow's ``verify`` does nothing for it, but libjpeg's
    scaled decoding still reads every byte of the compressed data, at a fraction of a full decode's cost."""
    with _open(path) as image:
        image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as error:
            raise _unreadable(path, error) from None


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; Pillow's ``convert("L")`` clips everything above 255 to white."""
    values = np.asarray(image).astype(np.float32)
    return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8))


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel or a transparent palette/grey colour; both are known from the header."""
    return image.mode in {"RGBA", "RGBa", "LA", "La", "PA"} or "transparency" in image.info


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if not _has_alpha(image):
        return image.convert("RGB")  # also CMYK, YCbCr, L, 1 and opaque palettes
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def load_image_rgb(
    path: str | Path, background: tuple[int, int, int] = (255, 255, 255), draft_side: int | None = None
) -> Image.Image:
    """The image as 8-bit RGB, upright per EXIF, transparency composited onto ``background``.

    ``draft_side``: a JPEG may be decoded at 1/2 to 1/8 scale while both sides stay at least this long
    (libjpeg's scaled decoding, several times cheaper; the studio's thumbnails); other formats decode whole.
    """
    path = Path(path)
    with _open(path) as image:
        if draft_side:
            image.draft("RGB", (draft_side, draft_side))
        try:
            upright = ImageOps.exif_transpose(image)  # decodes the pixels
            return _to_rgb(upright, background)
        except (OSError, ValueError, SyntaxError) as error:
            raise _unreadable(path, error) from None


def has_transparency(path: str | Path) -> bool:
    """Whether the image has transparency to use as a mask; reads the header only."""
    with _open(Path(path)) as image:
        return _has_alpha(image)


def load_mask_image(path: str | Path, alpha: bool = False) -> Image.Image:
    """A mask as 8-bit grey, upright per EXIF as its image is: the file's grey levels (a mask file, its colours
    as Pillow's "L" weighs them, 16-bit grey scaled rather than clipped), or with ``alpha`` its transparency."""
    path = Path(path)
    with _open(path) as image:
        try:
            upright = ImageOps.exif_transpose(image)  # decodes the pixels
            if alpha:
                return upright.convert("RGBA").getchannel("A")
            return _sixteen_bit_to_l(upright) if upright.mode in _SIXTEEN_BIT_MODES else upright.convert("L")
        except (OSError, ValueError, SyntaxError) as error:
            raise _unreadable(path, error) from None
