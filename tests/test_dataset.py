"""The dataset front: scanning kohya folders, reading awkward images and captions, caption options,
buckets and SDXL size conditioning, and ``check-data``. Every input is made here, small, in tmp_path."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main
from trainer.data.buckets import BucketSpec, assign_bucket, crop_plan, make_buckets, micro_conditioning
from trainer.data.captions import CaptionOptions, is_randomised, process_caption
from trainer.data.image_io import load_image_rgb, probe_image
from trainer.data.scan import scan_dataset
from trainer.errors import DatasetError, ImageLoadError

SDXL = BucketSpec()


def _image(path: Path, size=(96, 64), color=(200, 30, 30), caption: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _noise_png_bytes(size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose IHDR says width x height (CRC fixed): huge on paper, a few bytes on disk."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # after the 8-byte signature, length and b"IHDR"
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _by_name(scan):
    return {item.path.name: item for item in scan.items}


def _kinds(problems, name: str) -> set[str]:
    return {p.kind for p in problems if p.path.name == name}


# --- scanning -------------------------------------------------------------------------------------------


def test_kohya_folders_repeats_extensions_and_symlinks(tmp_path):
    root = tmp_path / "data"
    _image(root / "10_char" / "a.png", caption="1girl, smile")
    _image(root / "10_char" / "nested" / "b.JPG", caption="b")
    _image(root / "10_char" / "5_more" / "c.png", caption="c")
    _image(root / "0_x" / "d.png", caption="d")
    _image(root / "abc_x" / "e.Jpeg", caption="e")
    for name, fmt in (("f.WEBP", "WEBP"), ("g.bmp", "BMP"), ("h.PnG", "PNG"), ("i.jpg", "JPEG")):
        _image(root / "x" / name, caption=name, format=fmt)
    _image(root / "j.png", caption="j")
    (root / "x" / "notes.md").write_text("not an image")
    (root / "x" / "meta.json").write_text("{}")
    os.symlink(root, root / "10_char" / "nested" / "loop")  # a loop back to the top
    os.symlink(root / "x", root / "also_x")  # the same folder twice

    scan = scan_dataset(root)

    repeats = {name: item.repeats for name, item in _by_name(scan).items()}
    assert repeats == {
        "a.png": 10,
        "b.JPG": 10,
        "c.png": 5,
        "e.Jpeg": 1,
        "f.WEBP": 1,
        "g.bmp": 1,
        "h.PnG": 1,
        "i.jpg": 1,
        "j.png": 1,
    }
    assert scan.total_repeated_images == 10 + 10 + 5 + 6
    notes = {f.path.relative_to(root).as_posix(): (f.repeats, f.image_count, f.note) for f in scan.folders}
    assert notes["0_x"][:2] == (0, 1) and "skipped" in notes["0_x"][2]
    assert notes["abc_x"][0] == 1 and "no repeat prefix, using 1" in notes["abc_x"][2]
    assert notes["x"][0] == 1 and "no repeat prefix, using 1" in notes["x"][2]
    assert notes["10_char/nested"][0] == 10 and "from 10_char" in notes["10_char/nested"][2]
    assert "also_x" not in notes  # scanned once, under its real name
    assert _kinds(scan.problems, "loop") == {"symlink_loop"}
    assert _kinds(scan.problems, "also_x") == {"duplicate_folder"}
    assert scan.ignored_files == {".json": 1, ".md": 1}  # captions beside images are not "ignored"
    assert _by_name(scan)["a.png"].caption == "1girl, smile"
    assert (_by_name(scan)["a.png"].width, _by_name(scan)["a.png"].height) == (96, 64)


def test_broken_files_are_reported_and_the_scan_goes_on(tmp_path):
    root = tmp_path / "data"
    _image(root / "good.png", caption="good")
    (root / "zero.jpg").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(random.Random(0).randbytes(3000))
    png = _noise_png_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    _png_claiming_size(root / "bomb.png", 30000, 30000)
    _png_claiming_size(root / "big.png", 12000, 12000)  # 144 MP: within the limit
    _image(root / "tiny.png", size=(1, 1))
    _image(root / "fake.jpg", format="PNG", caption="fake")

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # 144 MP must not even warn
        scan = scan_dataset(root)

    assert sorted(_by_name(scan)) == ["big.png", "fake.jpg", "good.png"]
    assert (_by_name(scan)["big.png"].width, _by_name(scan)["big.png"].height) == (12000, 12000)
    skipped = {p.path.name: p for p in scan.problems if p.skipped}
    assert {name: p.kind for name, p in skipped.items()} == {
        "zero.jpg": "unreadable",
        "corrupt.jpg": "unreadable",
        "truncated.png": "unreadable",
        "bomb.png": "too_large",
        "tiny.png": "too_small",
    }
    assert "empty (0 bytes)" in skipped["zero.jpg"].message
    assert "downscale it" in skipped["bomb.png"].message and "bomb.png" in skipped["bomb.png"].message
    assert "format_mismatch" in _kinds(scan.problems, "fake.jpg")
    assert load_image_rgb(root / "fake.jpg").size == (96, 64)  # misnamed but readable


def test_captions_encodings_and_gaps(tmp_path):
    root = tmp_path / "data"
    _image(root / "latin.png").with_suffix(".txt").write_bytes(b"caf\xe9, smiling")
    _image(root / "bom.png").with_suffix(".txt").write_bytes(b"\xef\xbb\xbf1girl,\n  smile \r\n")
    _image(root / "utf16.png").with_suffix(".txt").write_bytes("na\u00efve, tag".encode("utf-16"))
    _image(root / "empty.png").with_suffix(".txt").write_bytes(b" \n\t")
    _image(root / "missing.png")

    scan = scan_dataset(root)
    items = _by_name(scan)

    assert items["latin.png"].caption == "café, smiling"
    encoding = [p for p in scan.problems if p.kind == "caption_encoding"]
    assert len(encoding) == 1 and "latin.txt" in encoding[0].message and not encoding[0].skipped
    assert items["bom.png"].caption == "1girl, smile"
    assert items["utf16.png"].caption == "naïve, tag"
    assert items["empty.png"].caption == "" and "empty_caption" in _kinds(scan.problems, "empty.txt")
    assert items["missing.png"].caption == "" and "missing_caption" in _kinds(scan.problems, "missing.png")


def test_caption_extension_without_dot_and_shared_stems(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png").with_suffix(".caption").write_text("from caption file")
    _image(root / "a.jpg")
    scan = scan_dataset(root, caption_extension="caption")
    assert {item.caption for item in scan.items} == {"from caption file"}
    assert "shared_caption" in _kinds(scan.problems, "a.caption")


@pytest.mark.parametrize("make", ["missing", "file", "empty", "only_broken"])
def test_unusable_roots_raise_dataset_error_with_the_fix(tmp_path, make):
    root = tmp_path / "data"
    if make == "file":
        root.write_text("x")
    elif make == "empty":
        (root / "10_char").mkdir(parents=True)
        (root / "10_char" / "a.txt").write_text("caption without image")
    elif make == "only_broken":
        root.mkdir()
        (root / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as raised:
        scan_dataset(root)
    message = str(raised.value)
    assert str(root) in message and "10_mychar" in message
    if make == "only_broken":
        assert "a.png" in message  # says why nothing was usable


# --- loading --------------------------------------------------------------------------------------------


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    stored = Image.new("RGB", (40, 24), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    assert (probe_image(path).width, probe_image(path).height) == (24, 40)
    image = load_image_rgb(path)
    assert image.size == (24, 40)
    red, green, _ = image.getpixel((24 - 4, 3))  # the stored top-left is now top-right
    assert red > 200 and green < 60
    assert image.getpixel((3, 3))[1] > 200  # top-left is white


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    red, green, blue = load_image_rgb(path).getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    ramp = np.tile(np.linspace(0, 65535, 257).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image_rgb(path))
    assert pixels.shape == (4, 257, 3) and pixels.min() == 0 and pixels.max() == 255
    assert abs(int(pixels[0, 128, 0]) - 128) <= 1  # a clipping conversion would give 255 here
    assert np.all(np.diff(pixels[0, :, 0].astype(int)) >= 0)


def test_palette_transparency_over_background(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.paste(1, (2, 0, 4, 4))  # right half opaque green, left half index 0 (transparent red)
    image.save(path, transparency=0)
    loaded = load_image_rgb(path, background=(0, 0, 255))
    assert loaded.getpixel((0, 0)) == (0, 0, 255) and loaded.getpixel((3, 0)) == (0, 255, 0)


@pytest.mark.parametrize(
    "mode, transparent, opaque", [("RGBA", (255, 0, 0, 0), (0, 255, 0, 255)), ("LA", (200, 0), (90, 255))]
)
def test_alpha_composited_over_background(tmp_path, mode, transparent, opaque):
    path = tmp_path / f"{mode}.png"
    image = Image.new(mode, (4, 2), transparent)
    image.paste(opaque, (0, 1, 4, 2))
    image.save(path)
    loaded = load_image_rgb(path, background=(10, 20, 30))
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (10, 20, 30)
    expected = opaque[:3] if mode == "RGBA" else (opaque[0],) * 3
    assert loaded.getpixel((0, 1)) == expected


def test_half_transparent_pixel_blends(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (2, 2), (255, 255, 255, 128)).save(path)
    assert all(abs(channel - 128) <= 1 for channel in load_image_rgb(path, background=(0, 0, 0)).getpixel((0, 0)))


def test_load_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not jpeg data")
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    bomb = _png_claiming_size(tmp_path / "bomb.png", 30000, 30000)

    for path in (corrupt, truncated):  # a truncated JPEG passes the header-only probe, not the load
        with pytest.raises(ImageLoadError, match=path.name):
            load_image_rgb(path)
    with pytest.raises(ImageLoadError, match="downscale it") as raised:
        load_image_rgb(bomb)
    assert raised.value.kind == "too_large"


# --- captions -------------------------------------------------------------------------------------------


def test_trigger_word_prepended_once():
    rng = random.Random(0)
    options = CaptionOptions(trigger_word="ohwx")
    assert process_caption("1girl, smile", options, rng) == "ohwx, 1girl, smile"
    assert process_caption("ohwx, 1girl", options, rng) == "ohwx, 1girl"
    assert process_caption("ohwx woman, smile", options, rng) == "ohwx woman, smile"
    assert process_caption("ohwxyz, smile", options, rng) == "ohwx, ohwxyz, smile"
    assert process_caption("", options, rng) == "ohwx"
    assert process_caption("a,b ,  c", CaptionOptions(), rng) == "a,b ,  c"  # untouched unless asked


def test_keep_tokens_and_shuffle_are_deterministic_per_seed():
    caption = "1girl, red hair, smile, outdoors, sky, tree, dress, hat"
    options = CaptionOptions(trigger_word="ohwx", shuffle_tags=True, keep_tokens=2)
    outputs = [process_caption(caption, options, random.Random(seed)) for seed in range(30)]
    for output in outputs:
        tags = output.split(", ")
        assert tags[:2] == ["ohwx", "1girl"]
        assert sorted(tags) == sorted(["ohwx", *caption.split(", ")])
    assert len(set(outputs)) > 10
    assert outputs == [process_caption(caption, options, random.Random(seed)) for seed in range(30)]


def test_tag_dropout_rate_and_kept_tags():
    caption = ", ".join(f"tag{i}" for i in range(11))
    rng = random.Random(1)
    options = CaptionOptions(keep_tokens=1, tag_dropout=0.3)
    kept = [len(process_caption(caption, options, rng).split(", ")) - 1 for _ in range(2000)]
    assert abs(sum(kept) / (2000 * 10) - 0.7) < 0.03
    assert process_caption(caption, CaptionOptions(keep_tokens=1, tag_dropout=1.0), rng) == "tag0"


def test_caption_dropout_gives_empty_caption_at_its_rate():
    rng = random.Random(2)
    options = CaptionOptions(trigger_word="ohwx", caption_dropout=0.25)
    outputs = [process_caption("1girl, smile", options, rng) for _ in range(4000)]
    assert abs(outputs.count("") / 4000 - 0.25) < 0.03
    assert set(outputs) == {"", "ohwx, 1girl, smile"}  # kohya drops the trigger (its prefix) too


def test_is_randomised_and_option_checks():
    assert not is_randomised(CaptionOptions(trigger_word="ohwx", keep_tokens=3))
    assert all(
        is_randomised(o)
        for o in (
            CaptionOptions(shuffle_tags=True),
            CaptionOptions(tag_dropout=0.1),
            CaptionOptions(caption_dropout=0.05),
        )
    )
    with pytest.raises(ValueError):
        CaptionOptions(caption_dropout=1.5)
    with pytest.raises(ValueError):
        CaptionOptions(keep_tokens=-1)


# --- buckets --------------------------------------------------------------------------------------------


def test_sdxl_bucket_list():
    buckets = make_buckets(SDXL)
    for expected in ((1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344)):
        assert expected in buckets
    assert buckets == sorted(buckets)
    assert all(w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 for w, h in buckets)
    assert len({w / h for w, h in buckets}) == len(buckets)  # one bucket per aspect ratio
    assert (512, 2048) in buckets and (2048, 512) in buckets  # kohya's extremes at these limits


def test_photo_assignment_and_crop_plan():
    buckets = make_buckets(SDXL)
    assert assign_bucket(1920, 1080, buckets, SDXL) == (1344, 768)
    assert assign_bucket(1080, 1920, buckets, SDXL) == (768, 1344)
    assert assign_bucket(832, 1216, buckets, SDXL) == (832, 1216)  # an exact bucket size is kept
    assert assign_bucket(1, 1, buckets, SDXL) == (1024, 1024)

    plan = crop_plan(1920, 1080, (1344, 768), random_crop=False, rng=random.Random(0))
    assert plan.resized_size == (1365, 768) and plan.crop_top_left == (0, 10)
    assert micro_conditioning((1080, 1920), plan.crop_top_left, (768, 1344)) == [1080, 1920, 0, 10, 768, 1344]
    portrait = crop_plan(1080, 1920, (768, 1344), random_crop=False, rng=random.Random(0))
    assert portrait.resized_size == (768, 1365) and portrait.crop_top_left == (10, 0)


def test_crop_plan_always_covers_the_bucket():
    buckets = make_buckets(SDXL)
    rng = random.Random(3)
    for width, height in [(64, 64), (100, 3000), (4000, 3000), (777, 555), (2049, 2047), (12000, 12000)]:
        bucket = assign_bucket(width, height, buckets, SDXL)
        for random_crop in (False, True):
            plan = crop_plan(width, height, bucket, random_crop, rng)
            (rw, rh), (top, left) = plan.resized_size, plan.crop_top_left
            assert rw >= bucket[0] and rh >= bucket[1] and min(rw - bucket[0], rh - bucket[1]) == 0
            assert 0 <= left <= rw - bucket[0] and 0 <= top <= rh - bucket[1]
    first = [crop_plan(4000, 3000, (1152, 896), True, random.Random(5)).crop_top_left for _ in range(2)]
    assert first[0] == first[1]


def test_no_upscale_buckets():
    spec = BucketSpec(no_upscale=True)
    assert assign_bucket(800, 600, [], spec) == (768, 576)
    plan = crop_plan(800, 600, (768, 576), False, random.Random(0), spec=spec)
    assert plan.resized_size == (800, 600) and plan.crop_top_left == (12, 16)  # trimmed, not resampled
    big = assign_bucket(3000, 2000, [], spec)  # shrunk to the area first, as kohya does
    assert big == (1216, 832) and big[0] * big[1] <= spec.max_area
    assert crop_plan(3000, 2000, big, False, random.Random(0), spec=spec).resized_size == (1248, 832)


def test_micro_conditioning_matches_diffusers():
    import torch
    from diffusers import StableDiffusionXLPipeline

    # _get_add_time_ids only reads these two sizes off the UNet: enough to call the real method.
    fake_pipe = SimpleNamespace(
        unet=SimpleNamespace(
            config=SimpleNamespace(addition_time_embed_dim=1),
            add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=6)),
        )
    )
    original, crop, target = (1080, 1920), (0, 10), (768, 1344)
    theirs = StableDiffusionXLPipeline._get_add_time_ids(
        fake_pipe, original, crop, target, dtype=torch.float32, text_encoder_projection_dim=0
    )
    assert theirs.tolist() == [micro_conditioning(original, crop, target)]


# --- check-data -----------------------------------------------------------------------------------------


def _small_dataset(root: Path) -> Path:
    _image(root / "10_char" / "a.png", size=(64, 64), caption="a")
    _image(root / "10_char" / "b.png", size=(64, 64), caption="b")
    _image(root / "10_char" / "c.png", size=(128, 64), caption="c")
    _image(root / "0_x" / "d.png", size=(64, 64), caption="d")
    (root / "10_char" / "broken.png").write_bytes(b"nope")
    return root


def test_check_data_json(tmp_path, capsys):
    root = _small_dataset(tmp_path / "data")
    assert main(["check-data", str(root), "--json", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 2 square images x 10 repeats in 1024x1024, 1 wide one x 10 in 1408x704: ceil(20/2) + ceil(10/2)
    assert report["buckets"] == {"1024x1024": 20, "1408x704": 10}
    assert report["steps_per_epoch"] == 15 and report["repeated_image_count"] == 30
    kinds = {(Path(p["path"]).name, p["kind"]) for p in report["problems"]}
    assert ("broken.png", "unreadable") in kinds and ("a.png", "upscaled") in kinds

    assert main(["check-data", str(root)]) == 0
    text = capsys.readouterr().out
    assert "steps per epoch at batch size 1: 30" in text and "0 repeats" in text


def test_check_data_exit_codes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["check-data", str(tmp_path / "empty"), "--json"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    root = _small_dataset(tmp_path / "data")
    assert main(["check-data", str(root), "--resolution", "32"]) == 2  # below the 64 px bucket step
    assert "no bucket fits" in capsys.readouterr().err
    assert main(["check-data", str(root), "--resolution", "256"]) == 0  # small buckets, e.g. for tiny models
    assert main(["check-data", str(root), "--batch-size", "0"]) == 2
