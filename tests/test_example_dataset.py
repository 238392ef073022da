"""The committed example dataset (``datasets_example/``): its script redraws it exactly, the dataset scanner
reads it cleanly, and every caption says, in the documented vocabulary, what its picture shows."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.scan import scan_dataset

DATASET = Path(__file__).parents[1] / "datasets_example"
SCRIPT = DATASET / "make_dataset.py"
SUBFOLDERS = ("10_zqx", "1_shapes")
# Another Pillow's JPEG encoder may round differently; a real change to the drawing moves far more than this.
JPEG_MAX_MEAN_ABS_DIFF = 2.0


@pytest.fixture(scope="module")
def script() -> dict:
    """The script's globals (colour tables, ``write_dataset``); run_path writes no __pycache__ beside it."""
    return runpy.run_path(str(SCRIPT), run_name="make_dataset")


def _dataset_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for sub in SUBFOLDERS for p in (root / sub).iterdir())


def _pixels(path: Path) -> tuple[tuple[int, int], bytes]:
    with Image.open(path) as image:
        return image.size, image.convert("RGB").tobytes()


def test_script_redraws_the_committed_dataset(tmp_path):
    out = tmp_path / "regenerated"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True, text=True)

    assert sorted(p.name for p in out.iterdir()) == sorted(SUBFOLDERS)  # nothing outside its two folders
    names = _dataset_files(DATASET)
    assert _dataset_files(out) == names
    for name in names:
        committed, redrawn = DATASET / name, out / name
        if name.endswith(".txt"):
            assert redrawn.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), name
        elif name.endswith(".png"):
            assert _pixels(redrawn) == _pixels(committed), (
                f"{name}: pixels differ; if Pillow changed, check the images and rerun {SCRIPT.name}"
            )
        else:
            (size, a), (redrawn_size, b) = _pixels(committed), _pixels(redrawn)
            assert redrawn_size == size, name
            diff = np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int)).mean()
            assert diff < JPEG_MAX_MEAN_ABS_DIFF, f"{name}: mean absolute difference {diff:.2f}"


def test_committed_files_are_the_promised_formats():
    images = [name for name in _dataset_files(DATASET) if not name.endswith(".txt")]
    jpegs = [name for name in images if name.endswith(".jpg")]
    assert len(jpegs) == 1
    for name in images:
        with Image.open(DATASET / name) as image:
            assert (image.format, image.mode) == ("JPEG" if name in jpegs else "PNG", "RGB"), name
    total = sum(p.stat().st_size for p in DATASET.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 300_000


def test_scanner_reads_the_committed_dataset_cleanly():
    scan = scan_dataset(DATASET)

    assert scan.problems == []  # not even a warning: this folder is the example of a good dataset
    assert scan.ignored_files == {".md": 1, ".py": 1}  # README.md and make_dataset.py, at the top
    assert {f.path.name: (f.repeats, f.image_count) for f in scan.folders} == {"10_zqx": (10, 12), "1_shapes": (1, 8)}
    assert scan.total_repeated_images == 12 * 10 + 8
    assert all(item.caption for item in scan.items)
    for item in scan.items:
        assert (" zqx " in item.caption) == (item.folder.name == "10_zqx"), item.path
    sizes = {(item.width, item.height) for item in scan.items}
    assert sizes == {(128, 128), (192, 128), (128, 192)}  # square, wide and tall buckets


def test_captions_use_the_documented_vocabulary_and_name_visible_colours(script):
    colours, backgrounds = script["COLOURS"], script["BACKGROUNDS"]
    caption_grammar = re.compile(
        rf"a (small|large) ({'|'.join(colours)}) (zqx|circle|square|triangle) "
        rf"on a ({'|'.join(backgrounds)}) background, "
        r"(top left|top|top right|left|centre|right|bottom left|bottom|bottom right)"
    )
    for name in _dataset_files(DATASET):
        if not name.endswith(".txt"):
            continue
        caption = (DATASET / name).read_text(encoding="utf-8")
        assert caption.endswith("\n") and "\n" not in caption[:-1], name
        match = caption_grammar.fullmatch(caption[:-1])
        assert match, f"{name}: {caption!r}"
        _, colour, shape, background, _ = match.groups()
        assert (shape == "zqx") == name.startswith("10_zqx/"), name

        image_path = next(p for p in (DATASET / name).parent.glob(Path(name).stem + ".*") if p.suffix != ".txt")
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=int)
        tolerance = 12 if image_path.suffix == ".jpg" else 0
        # shapes keep clear of the border, so the corners show the background
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            assert np.abs(corner - backgrounds[background]).max() <= tolerance + 1, (name, corner)
        near_colour = (np.abs(pixels - colours[colour]).max(axis=-1) <= tolerance + 8).sum()
        assert near_colour >= 30, f"{name}: hardly any {colour} pixels ({near_colour})"


def test_rerun_replaces_its_own_files_and_keeps_everything_else(script, tmp_path):
    concept = tmp_path / "10_zqx"
    concept.mkdir()
    (concept / "zqx_99.png").write_bytes(b"left by an older version of the script")
    (concept / "zqx_00.png").write_bytes(b"stale")
    (concept / "my_notes.md").write_text("the user's own file")
    (tmp_path / "zqx_98.png").write_bytes(b"outside the folders the script creates")

    script["write_dataset"](tmp_path)

    assert not (concept / "zqx_99.png").exists()
    assert (concept / "my_notes.md").read_text() == "the user's own file"
    assert (tmp_path / "zqx_98.png").exists()
    assert _pixels(concept / "zqx_00.png") == _pixels(DATASET / "10_zqx" / "zqx_00.png")
