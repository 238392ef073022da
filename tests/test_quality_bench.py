"""``bench/quality.py``: its exact measures on pictures whose answer is known, and its ``--quick`` form end
to end (a smoke test: the numbers of so short a run mean nothing). Its weight measures are tested with
``dora-studio analyze``, which shares them (tests/test_analyze.py)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainer.builtin.shapes import CONCEPT_SHAPE, PLAIN_SHAPES, Scene, paint
from trainer.builtin.toy_pretrain import random_scene

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from quality_metrics import match_shape, read_picture  # noqa: E402


@pytest.mark.parametrize("shape", [CONCEPT_SHAPE, *PLAIN_SHAPES])
@pytest.mark.parametrize("centre", [(64.0, 64.0), (40.0, 90.0)])
def test_each_drawn_shape_is_read_as_itself(shape, centre):
    scene = Scene((128, 128), shape, "blue", "pale yellow", "large", centre, 30.0)
    match = match_shape(paint(scene), scene.background)
    assert match.best == shape, match.iou
    assert match.iou[shape] > 0.85
    assert (match.concept_margin > 0.1) == (shape == CONCEPT_SHAPE)


def test_pictures_are_read_in_caption_words():
    rng = random.Random(5)
    scenes = [random_scene(rng, shapes=(CONCEPT_SHAPE, *PLAIN_SHAPES)) for _ in range(40)]
    # a centre within a pixel of a third's edge may be read, from anti-aliased pixels, in the next third
    clear = [scene for scene in scenes if all(abs(value - 128 * k / 3) > 1 for value in scene.centre for k in (1, 2))]
    assert len(clear) >= 35
    for scene in clear:
        reading = read_picture(paint(scene), scene.background)
        assert (reading.shape, reading.colour, reading.position) == (scene.shape, scene.colour, scene.position), (
            scene.caption
        )


def test_a_blank_picture_draws_nothing():
    match = match_shape(Image.new("RGB", (128, 128), (255, 255, 255)), "white")
    assert match.best is None and match.concept_iou == 0.0 and match.concept_margin == 0.0


def test_quality_bench_quick(tmp_path):
    env = {**os.environ, "DORA_STUDIO_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--quick", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    variants = {"LoRA", "DoRA input axis", "DoRA output axis", "VeRA", "DVoRA"}
    assert {run["variant"] for run in report["runs"]} == variants
    assert report["trainable_parameters"]["DVoRA r16"] > report["trainable_parameters"]["VeRA r16"] > 0
    for run in report["runs"]:
        assert math.isfinite(run["loss"]) and 0.0 <= run["concept_iou"] <= 1.0 and -1.0 <= run["concept_margin"] <= 1.0
        assert set(run["decomposition"]) == set(run["by_type"]) == {"output", "input"}
        assert set(run["by_type"]["input"]) == {"q", "k", "v", "out", "ff"}
    with Image.open(tmp_path / "out" / "quality-decomposition.png") as plot:
        assert plot.width > 400
    assert "Held-out denoising loss" in result.stdout and "Weight decomposition" in result.stdout
    assert "Per layer type, as the paper plots it" in result.stdout


def test_first_step_bench_reads_where_a_drawn_shape_is_and_names_its_third():
    from toy_first_step import ink_centroid, third_of

    rng = random.Random(7)
    for _ in range(40):
        scene = random_scene(rng)
        x, y = ink_centroid(paint(scene), scene.background)
        # a flat symmetric shape's ink is centred on it (the triangle is drawn about its centroid, too)
        assert abs(x - scene.centre[0]) < 1.0 and abs(y - scene.centre[1]) < 1.0, (scene, x, y)
        assert third_of(scene.centre, scene.size) == scene.position
