"""Datasets of several folders: kohya's subsets, regularization balancing, validation splits, and every file
that does not train named with its reason. kohya's rules are checked against a transcription of its own loop
(sd-scripts ``DreamBoothDataset.__init__``), written here independently of ours."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from trainer.config.parsing import from_dict
from trainer.data.buckets import BucketSpec
from trainer.data.check import format_report
from trainer.data.epoch_plan import plan_examples
from trainer.data.scan import scan_dataset, scan_subsets
from trainer.data.subsets import SubsetFolder, balance_regularization, held_out_indices
from trainer.errors import DatasetError
from trainer.training.dataset_config import check_configured, scan_configured, subset_folders

SPEC = BucketSpec(resolution=64, min_side=64, max_side=128, step=64)


def _image(path: Path, caption: str | None = None, size=(64, 64), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 30)).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _kohya_balance(train_total: int, reg_repeats: list[int]) -> list[int]:
    """kohya's loop as written in sd-scripts: register in order, then one more repeat each in turn."""
    registered: dict[int, int] = {}
    repeats = list(reg_repeats)
    n, first_loop = 0, True
    while n < train_total:
        for index in range(len(repeats)):
            if first_loop:
                registered[index] = repeats[index]
                n += repeats[index]
            else:
                repeats[index] += 1
                registered[index] = repeats[index]
                n += 1
            if n >= train_total:
                break
        first_loop = False
    return [registered.get(index, 0) for index in range(len(reg_repeats))]


def test_regularization_balance_is_kohyas_loop():
    rng = random.Random(0)
    cases = [(10, [1, 1, 1]), (3, [5, 5]), (7, [2, 2, 2]), (6, [2, 2, 2]), (1, [1]), (100, [3, 1, 4, 1, 5])]
    cases += [(rng.randint(1, 60), [rng.randint(1, 6) for _ in range(rng.randint(1, 8))]) for _ in range(300)]
    for train_total, reg in cases:
        assert balance_regularization(train_total, reg) == _kohya_balance(train_total, reg), (train_total, reg)
    assert balance_regularization(0, [2, 3]) == [0, 0]  # no training images: kohya registers none


def test_subsets_repeats_class_tokens_roles_and_weights(tmp_path):
    _image(tmp_path / "char" / "10_zqx woman" / "a.png", "zqx woman, smile")
    _image(tmp_path / "char" / "10_zqx woman" / "b.png")  # no caption: kohya's class tokens from the folder
    _image(tmp_path / "char" / "0_parked" / "c.png", "c")
    _image(tmp_path / "extra" / "d.png", "d")
    _image(tmp_path / "extra" / "5_x" / "e.png", "e")  # the subset's repeats win over the folder's 5
    for name in "fgh":
        _image(tmp_path / "reg" / f"{name}.png")
    config = from_dict(
        {
            "dataset": {
                "path": str(tmp_path / "char"),
                "trigger_word": "zqx",
                "flip": True,
                "prior_loss_weight": 0.5,
                "subsets": [
                    {"path": str(tmp_path / "extra"), "repeats": 3, "flip": False, "keep_tokens": 2},
                    {"path": str(tmp_path / "reg"), "role": "regularization", "class_tokens": "woman"},
                ],
            }
        }
    )
    scan = scan_configured(config)
    items = {item.path.name: item for item in scan.items if item.role == "train"}
    assert {name: item.repeats for name, item in items.items()} == {"a.png": 10, "b.png": 10, "d.png": 3, "e.png": 3}
    assert items["b.png"].caption == "zqx woman" and items["a.png"].caption == "zqx woman, smile"
    # reg: 26 training images per epoch; 3 images of 1 repeat, each repeated in turn up to 26 (9, 9, 8)
    assert [item.repeats for item in scan.items if item.role == "regularization"] == [9, 9, 8]
    assert all(item.caption == "woman" for item in scan.items if item.role == "regularization")
    assert {p.path.name for p in scan.other_files if p.kind == "parked"} == {"c.png"}

    examples = {e.path.name: e for e in plan_examples(scan, SPEC, config.dataset.prior_loss_weight)}
    assert examples["a.png"].flip and not examples["d.png"].flip  # a subset's own flip
    assert examples["d.png"].captions.keep_tokens == 2 and examples["a.png"].captions.keep_tokens == 0
    assert examples["f.png"].captions.trigger_word == ""  # class images never take the trigger word
    assert examples["a.png"].captions.trigger_word == "zqx"
    assert {e.loss_weight for name, e in examples.items() if name in "f.png g.png h.png"} == {0.5}
    assert {e.loss_weight for name, e in examples.items() if name in ("a.png", "d.png")} == {1.0}

    assert scan.folder_counts("train") == {
        "char/10_zqx woman": {"n_repeats": 10, "img_count": 2},
        "extra": {"n_repeats": 3, "img_count": 1},
        "extra/5_x": {"n_repeats": 3, "img_count": 1},
    }
    assert scan.folder_counts("regularization") == {"reg": {"n_repeats": 9, "img_count": 3}}  # ss_reg_dataset_dirs
    report = check_configured(config, scan)
    assert report.role_counts == {
        "train": {"images": 4, "per_epoch": 26},
        "regularization": {"images": 3, "per_epoch": 26},
    }
    text = format_report(report)
    assert "subset 2:" in text and "(regularization)" in text and "0_parked" in text and "c.png" in text


def test_validation_split_is_seeded_and_never_takes_regularization_images(tmp_path):
    for index in range(8):
        _image(tmp_path / "train" / f"{index}.png", f"image {index}")
    _image(tmp_path / "reg" / "r.png")
    folders = [SubsetFolder(tmp_path / "train"), SubsetFolder(tmp_path / "reg", role="regularization")]
    first = scan_subsets(folders, held_out_images=3, seed=7)
    again = scan_subsets(list(reversed(folders)), held_out_images=3, seed=7)
    held = sorted(item.path.name for item in first.held_out)
    assert held == sorted(item.path.name for item in again.held_out) and len(held) == 3
    assert held != sorted(item.path.name for item in scan_subsets(folders, 3, seed=8).held_out)
    assert not {item.path.name for item in first.items} & set(held)
    assert all(item.role == "validation" and item.repeats == 1 for item in first.held_out)
    paths = sorted(tmp_path.glob("train/*.png"))
    assert {paths[i].name for i in held_out_indices(paths, 3, 7)} == set(held)
    validation = plan_examples(first, SPEC, held_out=True)
    assert len(validation) == 3 and not any(e.flip for e in validation)
    with pytest.raises(DatasetError, match="hold out fewer"):
        scan_subsets(folders, held_out_images=8)


def test_validation_folder_and_nested_folders_scan_once(tmp_path):
    _image(tmp_path / "data" / "a.png", "a")
    _image(tmp_path / "data" / "val" / "v.png", "v")  # the validation folder lies inside the dataset folder
    _image(tmp_path / "data" / "masks" / "a.png")  # so does the mask folder
    config = from_dict(
        {
            "dataset": {"path": str(tmp_path / "data"), "masked_loss": True, "mask_path": str(tmp_path / "data/masks")},
            "validation": {"path": str(tmp_path / "data" / "val")},
        }
    )
    scan = scan_configured(config)
    assert [item.path.name for item in scan.items] == ["a.png"]
    assert [item.path.name for item in scan.held_out] == ["v.png"]
    assert {p.path.name for p in scan.other_files if p.kind == "own_folder"} == {"val", "masks"}
    assert subset_folders(config)[0].mask_path == tmp_path / "data" / "masks"


def test_every_file_that_does_not_train_is_named_with_its_reason(tmp_path):
    root = tmp_path / "data"
    _image(root / "ok.png", "ok")
    _image(root / "scan.tif", "a TIFF scan", format="TIFF")
    _image(root / "anim.gif", "a GIF", format="GIF")
    _image(root / "photo.jfif", "JPEG under another name", format="JPEG")
    _image(root / ".hidden.png", "hidden")
    _image(root / "0_parked" / "p.png", "parked")
    for name in ("layers.psd", "phone.heic", "README.md", "noextension", "cache.npz"):
        (root / name).write_bytes(b"x")
    (root / "orphan.txt").write_text("a caption whose image was renamed")
    (root / "broken.png").write_bytes(b"not a png")

    scan = scan_dataset(root)
    trained = sorted(item.path.name for item in scan.items)
    assert trained == ["anim.gif", "ok.png", "photo.jfif", "scan.tif"]  # what Pillow reads safely, read
    named = {p.path.name: p for p in scan.problems + scan.other_files}
    for name in ("layers.psd", "phone.heic", "README.md", "noextension", "cache.npz"):
        assert named[name].kind == "not_used" and name in named[name].message
    assert "export it as PNG" in named["layers.psd"].message
    assert named[".hidden.png"].kind == "hidden" and named["p.png"].kind == "parked"
    assert named["orphan.txt"].kind == "orphan_caption" and named["broken.png"].kind == "unreadable"
    every_file = {p.name for p in root.rglob("*") if p.is_file()}
    captions = {Path(name).with_suffix(".txt").name for name in trained}
    assert every_file - set(trained) - captions - {"p.txt", ".hidden.txt"} == set(named)
    report = format_report(check_configured(from_dict({"dataset": {"path": str(root)}})))
    for name in named:
        assert name in report


@pytest.mark.parametrize("case", ["missing_subset", "empty_regularization", "not_a_folder", "bad_role"])
def test_bad_subsets_name_the_folder_or_setting(tmp_path, case):
    _image(tmp_path / "train" / "a.png", "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"x")
    subset = {
        "missing_subset": {"path": str(tmp_path / "nowhere")},
        "empty_regularization": {"path": str(tmp_path / "empty"), "role": "regularization"},
        "not_a_folder": {"path": str(tmp_path / "file.png")},
        "bad_role": {"path": str(tmp_path / "empty"), "role": "reg"},
    }[case]
    settings = {"dataset": {"path": str(tmp_path / "train"), "subsets": [subset]}}
    if case == "bad_role":
        with pytest.raises(ValueError, match=r"dataset\.subsets\[0\]\.role"):
            from_dict(settings)
        return
    with pytest.raises(DatasetError) as raised:
        scan_configured(from_dict(settings))
    assert subset["path"] in str(raised.value)
    if case == "empty_regularization":
        assert "no usable images" in str(raised.value) and "repeats = 0" in str(raised.value)
