"""dora-studio caption: a tiny ONNX tagger and a tiny random BLIP built here, the modes, crashes, bad input; and
check-data's tag statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.captioning.options import ModelSettings, TaggerOptions
from trainer.captioning.run import CaptionPlan, caption_scan
from trainer.captioning.tagger import Tag, prepare_image, select_tags
from trainer.cli import main
from trainer.data.scan import scan_dataset

# The tagger's tags (name, category, score on a blue square). Ratings (9) come first, as in WD14's files.
TAGS = [
    ("general", 9, 0.7), ("sensitive", 9, 0.2), ("questionable", 9, 0.05), ("explicit", 9, 0.01),
    ("1girl", 0, 0.95), ("long_hair", 0, 0.6), ("^_^", 0, 0.4), ("smile", 0, 0.36),
    ("simple_background", 0, 0.34), ("hatsune_miku", 4, 0.9), ("kagamine_rin", 4, 0.8),
    ("red_theme", 0, None), ("white_border", 0, None),
]  # fmt: skip
SIZE = 32
RED, BLUE = (255, 0, 0), (0, 0, 255)
ON_BLUE = ["1girl", "hatsune miku", "long hair", "^_^", "smile"]  # over 0.35 (characters 0.85), best first


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _weights() -> tuple[np.ndarray, np.ndarray]:
    """(3, tags) weights on the image's mean B, G, R and (tags,) biases: fixed scores, except red_theme (from
    the red channel, so BGR order matters) and white_border (from green, which only white padding brings)."""
    weights = np.zeros((3, len(TAGS)), np.float32)
    biases = np.array([_logit(p) if p is not None else 0.0 for _, _, p in TAGS], np.float32)
    red, white = len(TAGS) - 2, len(TAGS) - 1
    weights[2, red], biases[red] = 0.05, -6.0  # R=255: 0.9988; R=0: 0.0025
    weights[1, white], biases[white] = 0.1, -10.0  # G=0: 0.00005; a black 2:1 image padded white, G=127.5: 0.94
    return weights, biases


def _expected_scores(image: Image.Image) -> np.ndarray:
    weights, biases = _weights()
    mean = prepare_image(image, SIZE).reshape(-1, 3).mean(axis=0)
    return 1 / (1 + np.exp(-(mean @ weights + biases)))


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    """A WD14-style tagger folder: NHWC input (batch, 32, 32, 3), per-tag sigmoid of a linear map of the mean
    colour, and its selected_tags.csv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("tagger")
    weights, biases = _weights()
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "biases"], ["shifted"]),
            helper.make_node("Sigmoid", ["shifted"], ["predictions_sigmoid"]),
        ],
        "tiny-tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(biases, "biases")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{category},100" for i, (name, category, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _dataset(root: Path, colours: dict[str, tuple[int, int, int]], captions: dict[str, str] | None = None) -> Path:
    """Square 64 px images named by ``colours`` in ``root/5_thing`` (so the scan finds them), with captions."""
    folder = root / "5_thing"
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    for name, text in (captions or {}).items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def _caption(folder: Path, name: str) -> str:
    return (folder / f"{name}.txt").read_text(encoding="utf-8")


def test_tagger_thresholds_order_and_underscores_exactly(tagger_dir, tmp_path, capsys):
    folder = _dataset(tmp_path / "data", {"blue": BLUE, "red": RED})
    blue_scores = _expected_scores(Image.new("RGB", (64, 64), BLUE))
    assert np.allclose(blue_scores[:11], [p for _, _, p in TAGS[:11]], atol=1e-6)

    assert main(["caption", str(tmp_path / "data"), "--model", str(tagger_dir), "--trigger", "sks"]) == 0
    assert _caption(folder, "blue") == ", ".join(["sks", *ON_BLUE]) + "\n"
    assert _caption(folder, "red") == ", ".join(["sks", "red theme", *ON_BLUE]) + "\n"  # 0.9988 leads
    assert "captions written: 2" in capsys.readouterr().out

    # thresholds, exclusion (any case or spelling), underscores kept, rating first, tags always added
    args = ["caption", str(tmp_path / "data"), "--model", str(tagger_dir), "--mode", "overwrite"]
    strict = ["--general-threshold", "0.5", "--character-threshold", "0.95", "--exclude-tags", "SMILE"]
    assert main([*args, *strict, "--underscores", "--rating", "--always-tags", "solo, 1girl"]) == 0
    assert _caption(folder, "blue") == "solo, 1girl, general, long_hair\n"  # 1girl once, in its always-tag place
    assert main([*args, "--exclude-tags", "Long Hair, smile"]) == 0
    assert _caption(folder, "red") == "red theme, 1girl, hatsune miku, ^_^\n"  # the kaomoji keeps its underscore

    # the same selection, function against numpy: >= at the threshold, ties in the file's order
    tags = [Tag(name, category) for name, category, _ in TAGS]
    scores = np.array([0.1, 0.1, 0.1, 0.1, 0.35, 0.9, 0.9, 0.3, 0.1, 0.85, 0.84, 0.0, 0.0], np.float32)
    assert select_tags(scores, tags, TaggerOptions()) == ["long hair", "^_^", "hatsune miku", "1girl"]


def test_padding_is_white_and_bgr(tagger_dir, tmp_path):
    wide_black = Image.new("RGB", (64, 32), (0, 0, 0))
    prepared = prepare_image(wide_black, SIZE)
    assert prepared.shape == (SIZE, SIZE, 3) and prepared.dtype == np.float32
    assert prepared[0, 0].tolist() == [255, 255, 255] and prepared[SIZE // 2, SIZE // 2].tolist() == [0, 0, 0]
    assert prepare_image(Image.new("RGB", (8, 8), RED), 8)[0, 0].tolist() == [0, 0, 255]  # BGR
    assert np.allclose(_expected_scores(wide_black)[-2:], [0.5927, 0.9399], atol=1e-3)  # mean 127.5: half white

    root = tmp_path / "data"
    folder = root / "1_wide"
    folder.mkdir(parents=True)
    wide_black.resize((128, 64)).save(folder / "wide.png")
    scan = scan_dataset(root)
    caption_scan(scan, tagger_dir, ModelSettings(), CaptionPlan(), show_progress=False)
    # the white bands bring green (white border, 0.940) and red (red theme, 0.593) to a black picture
    expected = ["1girl", "white border", "hatsune miku", "long hair", "red theme", "^_^", "smile"]
    assert _caption(folder, "wide") == ", ".join(expected) + "\n"


def test_modes_keep_replace_or_append(tagger_dir, tmp_path):
    captions = {"a": "my own words", "b": "1girl, long_hair, blue", "c": "   "}
    folder = _dataset(tmp_path / "data", {"a": BLUE, "b": BLUE, "c": BLUE, "d": BLUE}, captions)
    scan = scan_dataset(tmp_path / "data")

    def run(mode: str, dry_run: bool = False):
        return caption_scan(scan, tagger_dir, ModelSettings(), CaptionPlan(mode, dry_run=dry_run), False)

    preview = run("overwrite", dry_run=True)
    assert len(preview.previews) == 4 and preview.written == 0 and _caption(folder, "a") == "my own words"
    assert f"{folder / 'a.txt'}: {', '.join(ON_BLUE)}" in preview.previews

    report = run("missing")  # c's caption is blank: missing; d has none
    assert (report.written, report.already_captioned) == (2, 2)
    assert _caption(folder, "a") == "my own words" and _caption(folder, "c") == ", ".join(ON_BLUE) + "\n"
    assert run("missing").written == 0  # a second run finds them done

    report = run("append")  # b already has 1girl and long hair (in another spelling): not added twice
    assert _caption(folder, "b") == "1girl, long_hair, blue, hatsune miku, ^_^, smile\n"
    assert _caption(folder, "a") == "my own words, " + ", ".join(ON_BLUE) + "\n"
    assert report.unchanged == 2 and report.written == 2  # c and d had every tag already

    run("overwrite")
    assert {_caption(folder, name) for name in "abcd"} == {", ".join(ON_BLUE) + "\n"}
    assert not list(folder.glob(".*"))  # no journal or temp file left


def test_a_crash_leaves_every_caption_whole_and_a_rerun_finishes(tagger_dir, tmp_path, monkeypatch, capsys):
    from trainer.captioning import writer
    from trainer.files import write_bytes_atomically

    names = [f"img{i}" for i in range(6)]
    folder = _dataset(tmp_path / "data", dict.fromkeys(names, BLUE), dict.fromkeys(names, "old caption"))
    calls = []

    def crash_on_the_fourth(path, chunks):
        calls.append(path)
        if len(calls) < 4:
            return write_bytes_atomically(path, chunks)

        def half_then_crash():
            data = b"".join(chunks)
            yield data[: len(data) // 2]
            raise RuntimeError("power cut")

        return write_bytes_atomically(path, half_then_crash())

    monkeypatch.setattr(writer, "write_bytes_atomically", crash_on_the_fourth)
    args = ["caption", str(tmp_path / "data"), "--model", str(tagger_dir), "--mode", "overwrite", "--batch-size", "2"]
    with pytest.raises(RuntimeError, match="power cut"):
        main(args)
    new = ", ".join(ON_BLUE) + "\n"
    contents = [_caption(folder, name) for name in names]
    assert contents == [new] * 3 + ["old caption"] * 3  # whole: old or new, never part
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # temp file removed
    assert (tmp_path / "data" / ".dora-studio-captioning").is_file()

    monkeypatch.setattr(writer, "write_bytes_atomically", write_bytes_atomically)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "captions written: 3" in out and "done by the interrupted run these settings continue: 3" in out
    assert [_caption(folder, name) for name in names] == [new] * 6
    assert not (tmp_path / "data" / ".dora-studio-captioning").exists()


def test_bad_images_and_unwritable_captions_are_named_and_the_rest_captioned(tagger_dir, tmp_path, capsys):
    folder = _dataset(tmp_path / "data", {"good": BLUE, "locked": BLUE})
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "locked.txt").mkdir()  # a caption path nothing can be written to, whoever runs the test
    assert main(["caption", str(tmp_path / "data"), "--model", str(tagger_dir)]) == 2
    out = capsys.readouterr().out
    assert "captions written: 1" in out and _caption(folder, "good") == ", ".join(ON_BLUE) + "\n"
    assert f"{folder / 'broken.png'}: cannot read this image" in out
    assert f"{folder / 'locked.txt'}: cannot write the caption" in out and "writable" in out

    # a threshold nothing reaches: no caption is written, and the image is named
    assert main(["caption", str(tmp_path / "data"), "--model", str(tagger_dir), "--mode", "overwrite",
                 "--general-threshold", "1", "--character-threshold", "1"]) == 2  # fmt: skip
    assert "the model gave no caption" in capsys.readouterr().out


def test_wrong_model_folders_are_named_with_what_they_should_hold(tagger_dir, tmp_path, capsys):
    _dataset(tmp_path / "data", {"a": BLUE})
    data = str(tmp_path / "data")

    def error(model: Path) -> str:
        assert main(["caption", data, "--model", str(model)]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: holds no captioning model" in error(empty) and "selected_tags.csv" in error(empty)
    assert "does not exist" in error(tmp_path / "nowhere")

    no_csv = tmp_path / "no-csv"
    no_csv.mkdir()
    (no_csv / "model.onnx").write_bytes((tagger_dir / "model.onnx").read_bytes())
    assert f"{no_csv}: a WD14-style tagger folder needs" in (text := error(no_csv)) and "selected_tags.csv is" in text

    (no_csv / "selected_tags.csv").write_text("id,label\n0,cat\n", encoding="utf-8")
    assert "selected_tags.csv: not a WD14 tags file" in error(no_csv)
    (no_csv / "selected_tags.csv").write_text("tag_id,name,category,count\n0,cat,0,1\n", encoding="utf-8")
    assert "scores 13 tags but selected_tags.csv lists 1" in error(no_csv)

    text_model = tmp_path / "bert"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    assert "holds a 'bert' model" in (text := error(text_model)) and "image-to-text" in text

    assert main(["caption", data, "--model", str(tagger_dir), "--general-threshold", "2"]) == 2
    assert "--general-threshold 2.0: must be between 0 and 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory) -> Path:
    """A random BLIP (one layer per tower, 32 px images) with a 17-word vocabulary, saved as save_pretrained
    writes it: what Salesforce/blip-image-captioning-* holds, tiny."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "sky"]
    words += ["tree", "girl", "hat", "café"]
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config=layer | {"vocab_size": len(words), "max_position_embeddings": 64, "bos_token_id": 2,
                             "sep_token_id": 3, "pad_token_id": 0},
        vision_config=layer | {"image_size": 32, "patch_size": 16},
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def test_a_transformers_captioner_captions_every_image_and_keeps_or_replaces(captioner_dir, tmp_path, capsys):
    colours = {"a": RED, "b": BLUE, "c": (20, 200, 20)}
    folder = _dataset(tmp_path / "data", colours, {"a": "mine"})
    base = ["caption", str(tmp_path / "data"), "--model", str(captioner_dir), "--max-length", "8"]
    assert main(base) == 0
    assert "BlipForConditionalGeneration" in capsys.readouterr().out
    assert _caption(folder, "a") == "mine"
    for name in "bc":
        text = (folder / f"{name}.txt").read_bytes().decode("utf-8")  # UTF-8, one line, not empty
        assert text.endswith("\n") and text.strip() and "\n" not in text.strip()

    assert main([*base, "--mode", "overwrite", "--beams", "2", "--trigger", "sks", "--prompt", "a photo of"]) == 0
    for name in colours:
        assert _caption(folder, name).startswith("sks, ") and len(_caption(folder, name)) > len("sks, \n")
    before = {name: _caption(folder, name) for name in colours}
    assert main([*base, "--mode", "append", "--beams", "2", "--trigger", "sks", "--prompt", "a photo of"]) == 0
    assert {name: _caption(folder, name) for name in colours} == before  # the same sentence is not added twice


def test_tag_statistics_in_check_data(tmp_path, capsys):
    many = ", ".join(f"tag{i}" for i in range(40))  # sks + 10 x (",", "tag", digit) + 30 x (",", "tag", 2 digits)
    captions = {"a": "sks, 1girl, smile", "b": "sks, 1girl, red hat", "c": f"sks, {many}"}
    folder = _dataset(tmp_path / "data", dict.fromkeys(captions, BLUE), captions)
    assert main(["check-data", str(tmp_path / "data"), "--json", "--resolution", "256"]) == 0
    tags = json.loads(capsys.readouterr().out)["tags"]
    assert tags["training_images"] == 3 and tags["on_every_image"] == ["sks"]
    assert tags["most_frequent"][:3] == [{"tag": "sks", "images": 3}, {"tag": "1girl", "images": 2},
                                         {"tag": "red hat", "images": 1}]  # fmt: skip
    assert len(tags["most_frequent"]) == 20 and tags["caption_token_limit"] == 75
    assert tags["long_captions"] == [{"path": str(folder / "c.png"), "tokens": 1 + 10 * 3 + 30 * 4}]
    assert tags["token_count"].startswith("lower bound")

    assert main(["check-data", str(tmp_path / "data"), "--resolution", "256"]) == 0
    text = capsys.readouterr().out
    assert "on every training image" in text and "      3  sks" in text
    assert f"{folder / 'c.png'}: 151 tokens or more" in text and "lower bound" in text


def test_the_trigger_word_counts_toward_the_token_limit(tmp_path):
    from trainer.data.buckets import BucketSpec
    from trainer.data.captions import CaptionOptions
    from trainer.data.check import report_for_scan
    from trainer.data.scan import scan_subsets
    from trainer.data.subsets import SubsetFolder

    _dataset(tmp_path / "data", {"a": BLUE, "b": BLUE}, {"a": " ".join(["word"] * 75), "b": "short"})
    subset = SubsetFolder(tmp_path / "data", captions=CaptionOptions(trigger_word="sks"))
    report = report_for_scan(scan_subsets([subset]), BucketSpec(resolution=256, min_side=64, max_side=512), 1)
    assert [(path.name, tokens) for path, tokens in report.tags.long_captions] == [("a.png", 77)]  # sks, word...


def test_token_lower_bound_is_clips_pretokenizer():
    from transformers import CLIPTokenizer

    from trainer.data.tag_stats import clip_token_lower_bound

    backend = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).backend_tokenizer
    for text in [
        "1girl, long_hair, it's (masterpiece:1.2) HÉllo 日本 ^_^ 2024!! rock'n'roll",
        "a photo of a cat, sitting on a red sofa",
    ]:
        pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        assert clip_token_lower_bound(text) == len(pieces), text
    assert clip_token_lower_bound("x² ½") <= 3  # numbers other than digits are one letter run to Python's re


def test_the_studio_captions_the_forms_dataset(tagger_dir, tmp_path):
    from app.captioning import caption_form_dataset
    from trainer.config.parsing import to_dict
    from trainer.config.schema import TrainConfig

    folder = _dataset(tmp_path / "data", {"a": BLUE, "b": RED}, {"a": "mine"})
    settings = to_dict(TrainConfig())
    settings["dataset"]["path"] = str(tmp_path / "data")
    text = caption_form_dataset(settings, str(tagger_dir), "missing", 0.35, 0.85, "sks")
    assert "captions written: 1" in text and "already captioned" in text
    assert _caption(folder, "a") == "mine" and _caption(folder, "b").startswith("sks, red theme, 1girl")
    only_a = caption_form_dataset(settings, str(tagger_dir), "overwrite", 0.35, 0.85, "", images=[folder / "a.png"])
    assert "captions written: 1" in only_a  # the Dataset tab's selection: b is left as it was
    assert _caption(folder, "a") != "mine" and _caption(folder, "b").startswith("sks, red theme")
    assert "holds no captioning model" in caption_form_dataset(settings, str(tmp_path), "overwrite", 0.35, 0.85, "")
    assert caption_form_dataset(settings, " ", "missing", 0.35, 0.85, "") == "Give the model folder first."
