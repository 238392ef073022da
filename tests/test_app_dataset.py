"""The studio's Dataset tab without a browser: its handlers on a folder with problems, as a run scans it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from app import dataset_files
from app.dataset_tab import DatasetTab
from app.form import form_values
from app.thumbnails import THUMBNAIL_SIDE
from trainer.config.presets import load_config
from trainer.data.scan import scan_dataset

QUICKSTART = Path(__file__).resolve().parents[1] / "presets" / "quickstart.toml"
FORM = form_values(load_config(QUICKSTART))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """10_char/ with a captioned PNG, an uncaptioned one, a broken PNG, a .psd and a captioned JPEG."""
    folder = tmp_path / "data" / "10_char"
    folder.mkdir(parents=True)
    Image.new("RGB", (640, 480), (200, 30, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("char, red hair, smile", encoding="utf-8")
    Image.new("RGB", (480, 640), (30, 200, 30)).save(folder / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "c.psd").write_bytes(b"8BPS")
    Image.new("RGB", (512, 512), (30, 30, 200)).save(folder / "d.jpg")
    (folder / "d.txt").write_bytes("char, blue hair, café".encode("cp1252"))  # not UTF-8
    return tmp_path / "data"


def _values(folder: Path, tag: str = "", kind: str = "", selected: str = "", text: str = "") -> list:
    """The handlers' inputs as the page sends them: folder box, filters, selection, caption box, the form."""
    return [str(folder), tag, kind, selected, text, *FORM]


def _open(tab: DatasetTab, folder: Path, **filters: str) -> tuple[str, list, list[dict]]:
    message, gallery, table, _, _ = tab.open(*_values(folder, **filters))
    return message, gallery, table.to_dict("records")


def test_every_picture_is_listed_with_its_role_problems_and_a_cached_thumbnail(dataset, tmp_path):
    tab = DatasetTab(tmp_path / "runs")
    message, gallery, rows = _open(tab, dataset)
    assert [row["file"] for row in rows] == [
        f"10_char/{name}" for name in ("a.png", "b.png", "broken.png", "c.psd", "d.jpg")
    ]
    by_file = {row["file"].removeprefix("10_char/"): row for row in rows}
    assert by_file["a.png"] | {"problems": ""} == {
        "file": "10_char/a.png",
        "folder": "10_char",
        "role": "train",
        "repeats": 10,
        "bucket": "128x128",  # the quick start trains the toy model at 128 px
        "caption": "char, red hair, smile",
        "problems": "",
    }
    assert by_file["b.png"]["problems"].startswith("missing_caption: no caption file b.txt")
    assert (
        by_file["broken.png"]["role"] == "skipped"
        and "unreadable: cannot read this image" in by_file["broken.png"]["problems"]
    )
    assert by_file["c.psd"]["role"] == "not used" and "a Photoshop file" in by_file["c.psd"]["problems"]
    assert by_file["d.jpg"]["caption"] == "char, blue hair, café" and "caption_encoding" in by_file["d.jpg"]["problems"]
    assert "3 train, 1 skipped, 1 not used; showing 5" in message

    thumbnails = [Path(path) for path, _ in gallery]
    assert all(path.is_relative_to(tmp_path / "runs" / ".thumbnails") for path in thumbnails)  # served from runs/
    with Image.open(thumbnails[0]) as small:
        assert small.format == "JPEG" and max(small.size) == THUMBNAIL_SIDE
    assert thumbnails[2] == thumbnails[3] and thumbnails[2].name == "no-preview.png"  # broken and .psd
    assert gallery[2][1].startswith("broken.png (skipped): unreadable: cannot read this image")
    assert gallery[0][1] == "a.png: char, red hair, smile"
    made = {path: path.stat().st_mtime_ns for path in thumbnails}
    assert [Path(path) for path, _ in _open(tab, dataset)[1]] == thumbnails  # found again, not made again
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in made.items())


def test_filters_by_tag_and_by_problem(dataset, tmp_path):
    tab = DatasetTab(tmp_path / "runs")
    files = lambda **filters: [row["file"].removeprefix("10_char/") for row in _open(tab, dataset, **filters)[2]]  # noqa: E731
    assert files(tag="HAIR") == ["a.png", "d.jpg"]
    assert files(tag="red") == ["a.png"]
    assert files(kind="missing_caption") == ["b.png"]
    assert files(kind="*") == ["b.png", "broken.png", "c.psd", "d.jpg"]
    _, _, _, tags, kinds = tab.open(*_values(dataset))
    assert "`char` 3" in tags and "**On every image**" in tags
    assert ("missing_caption (1)", "missing_caption") in kinds.choices


def test_a_caption_is_edited_in_place_and_a_failed_write_keeps_the_old_one(dataset, tmp_path, monkeypatch):
    tab = DatasetTab(tmp_path / "runs")
    _, _, table, _, _ = tab.open(*_values(dataset))
    selected, text, details = tab.select(
        gr.SelectData(None, {"index": 4, "value": None}), table, *_values(dataset)
    )  # a gallery tile
    assert (selected, text) == ("10_char/d.jpg", "char, blue hair, café")
    assert "not UTF-8" in details and "10 repeats" in details

    saved = tab.save(*_values(dataset, selected="10_char/d.jpg", text="char,  blue hair,\ncafé "))
    assert "Saved d.txt." in saved[0] and saved[5:7] == ["10_char/d.jpg", "char, blue hair, café"]
    assert (dataset / "10_char" / "d.txt").read_text(encoding="utf-8") == "char, blue hair, café\n"
    assert "caption_encoding" not in saved[2].to_dict("records")[4]["problems"]  # the scan agrees

    def full_disk(path, caption):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_files, "write_caption", full_disk)
    failed = tab.save(*_values(dataset, selected="10_char/a.png", text="lost"))
    assert (
        "a.txt" in failed[0] and "No space left on device" in failed[0] and "the old caption is unchanged" in failed[0]
    )
    assert (dataset / "10_char" / "a.txt").read_text(encoding="utf-8") == "char, red hair, smile"
    monkeypatch.undo()

    (dataset / "10_char" / "b.txt").mkdir()  # the caption's name taken by a folder: the write cannot land
    failed = tab.save(*_values(dataset, selected="10_char/b.png", text="new"))
    assert "b.txt" in failed[0] and "Please fix" in failed[0]
    assert (dataset / "10_char" / "b.txt").is_dir() and not list((dataset / "10_char").glob(".b.txt*"))


def test_exclude_parks_an_image_with_its_caption_and_restore_brings_both_back(dataset, tmp_path):
    tab = DatasetTab(tmp_path / "runs")
    folder = dataset / "10_char"
    out = tab.exclude(*_values(dataset, selected="10_char/a.png"))
    assert out[5] == "10_char/0_excluded/a.png" and "Moved a.png" in out[0]
    assert not (folder / "a.png").exists() and (folder / "0_excluded" / "a.txt").is_file()
    scan = scan_dataset(dataset)
    assert [p.kind for p in scan.other_files if p.path.name == "a.png"] == ["parked"]
    assert folder / "0_excluded" / "a.png" not in [item.path for item in scan.items]
    assert {row["file"]: row["role"] for row in out[2].to_dict("records")}["10_char/0_excluded/a.png"] == "parked"

    assert "already in 0_excluded" in tab.exclude(*_values(dataset, selected=out[5]))[0]
    Image.new("RGB", (64, 64)).save(folder / "a.png")  # a new a.png where the old one would go back
    refused = tab.restore(*_values(dataset, selected=out[5]))
    assert "a.png" in refused[0] and "already exists" in refused[0] and (folder / "0_excluded" / "a.png").is_file()
    (folder / "a.png").unlink()

    back = tab.restore(*_values(dataset, selected=out[5]))
    assert back[5] == "10_char/a.png" and (folder / "a.png").is_file() and (folder / "a.txt").is_file()
    assert not (folder / "0_excluded").exists()
    assert folder / "a.png" in [item.path for item in scan_dataset(dataset).items]
    assert "only excluded images can be restored" in tab.restore(*_values(dataset, selected="10_char/a.png"))[0]


def test_a_path_outside_the_dataset_is_refused(dataset, tmp_path):
    tab = DatasetTab(tmp_path / "runs")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    (tmp_path / "outside.txt").write_text("keep me")
    (dataset / "10_char" / "link.png").symlink_to(outside)
    for name in ("../outside.png", str(outside), "10_char/../../outside.png", "10_char/link.png"):
        for action in (tab.save, tab.exclude):
            message = action(*_values(dataset, selected=name, text="overwritten"))[0]
            assert "not inside the dataset folder" in message, (name, message)
    clicked = gr.SelectData(None, {"index": [0, 0], "value": "", "row_value": ["../outside.png", "..", "train"]})
    selected = tab.select(clicked, None, *_values(dataset))  # a table row the page made up
    assert selected[0] == "" and "not inside the dataset folder" in selected[2]
    assert tab.caption(
        None, "the selected image", "", "missing", 0.35, 0.85, "", *_values(dataset, selected="../outside.png")
    )[0].startswith("**Please fix:**")
    assert (tmp_path / "outside.txt").read_text() == "keep me" and outside.is_file()


def test_a_missing_folder_is_named_and_the_tab_keeps_working(tmp_path):
    message, gallery, table, _, _ = DatasetTab(tmp_path / "runs").open(*_values(tmp_path / "nowhere"))
    assert "nowhere" in message and "does not exist" in message and gallery == [] and table.empty
