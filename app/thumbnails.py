"""Thumbnails for the Dataset tab, made once per version of an image and kept in the runs folder.

The studio serves files from the runs folder only (``app.serve``), never from a dataset folder, so the
browser sees each image through a small JPEG in ``<runs>/.thumbnails/``. Its name hashes the image's path,
size and modification time: an edited image gets a new thumbnail, and an unchanged one is found again with one
``stat``, which is what opens a folder of thousands of images in a second the second time. New thumbnails are
made on a few threads (Pillow decodes and resizes outside the GIL), JPEGs decoded at reduced scale. Old
versions are not pruned: a thumbnail is a few kilobytes, and deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

from trainer.data.image_io import load_image_rgb
from trainer.errors import ImageLoadError
from trainer.files import atomic_path

THUMBNAIL_SIDE = 256
THUMBNAILS_FOLDER = ".thumbnails"
PLACEHOLDER_NAME = "no-preview.png"
WORKERS = min(8, os.cpu_count() or 1)


class Thumbnails:
    """The thumbnail cache of one runs folder."""

    def __init__(self, runs_dir: Path) -> None:
        self.folder = Path(runs_dir) / THUMBNAILS_FOLDER

    def _name(self, image: Path) -> str:
        stat = image.stat()
        key = f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{THUMBNAIL_SIDE}"
        return hashlib.sha1(key.encode()).hexdigest() + ".jpg"

    def placeholder(self) -> Path:
        """The tile shown for a file without pictures to show (its reason is in its caption)."""
        path = self.folder / PLACEHOLDER_NAME
        if not path.is_file():
            tile = Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), (200, 200, 200))
            ImageDraw.Draw(tile).text((THUMBNAIL_SIDE // 2, THUMBNAIL_SIDE // 2), "no preview", "black", anchor="mm")
            with atomic_path(path) as tmp:
                tile.save(tmp, "PNG")
        return path

    def one(self, image: Path) -> tuple[Path, str]:
        """The image's thumbnail, made if missing; the placeholder and the reason when it cannot be made."""
        try:
            path = self.folder / self._name(image)
            if not path.is_file():
                picture = load_image_rgb(image, draft_side=THUMBNAIL_SIDE)
                picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                with atomic_path(path) as tmp:
                    picture.save(tmp, "JPEG", quality=85)
            return path, ""
        except ImageLoadError as error:
            return self.placeholder(), error.problems[0].message
        except OSError as error:  # the image vanished, or the runs folder is not writable
            return self.placeholder(), f"no preview: {error}"

    def many(self, images: list[Path]) -> list[tuple[Path, str]]:
        """``one`` for each image, in order, on ``WORKERS`` threads."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.placeholder()  # made once here, not raced for by the threads
        with ThreadPoolExecutor(WORKERS) as pool:
            return list(pool.map(self.one, images))
