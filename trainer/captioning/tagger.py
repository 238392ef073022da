"""A WD14-style tagger: an ONNX model that scores every tag of its ``selected_tags.csv``, run with onnxruntime.

The conventions are SmilingWolf's, who trains these models (his ``wd-tagger`` demo and the model cards), and
kohya sd-scripts' ``finetune/tag_images_by_wd14_tagger.py``: the input is NHWC float32 in 0-255, BGR, the
image padded to a square with white and resized to the model's input size (read from the model, 448 for
the published ones); the output is one sigmoid score per CSV row, in row order. The CSV's columns are
``tag_id,name,category,count``; category 0 is a general tag, 4 a character, 9 a rating.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.errors import ModelLoadError
from trainer.optional_packages import import_optional

from .options import TaggerOptions
from .tags import shown_name, tag_key

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
FEATURE = "captioning with a WD14 tagger (model.onnx)"


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_tags(path: Path) -> list[Tag]:
    """The tags file's rows, in order (the model's outputs follow it)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ModelLoadError.at(path, f"cannot read the tags file ({error}); copy it again from the tagger") from None
    if not {"name", "category"} <= columns:
        raise ModelLoadError.at(
            path,
            f"not a WD14 tags file: it needs the columns tag_id,name,category,count (found {sorted(columns)}); "
            "use the selected_tags.csv that came with the model",
        )
    tags = []
    for line, row in enumerate(rows, start=2):
        try:
            tags.append(Tag(row["name"], int(row["category"])))
        except (TypeError, ValueError):
            raise ModelLoadError.at(
                f"{path}:{line}", f"category {row['category']!r} is not a number; use the model's own tags file"
            ) from None
    return tags


def select_tags(scores: np.ndarray, tags: list[Tag], options: TaggerOptions) -> list[str]:
    """The tags at or over their category's threshold (kohya compares with ``>=``), most confident first
    (ties keep the CSV's order), excluded ones left out; with ``rating`` the most likely rating tag (argmax, as
    kohya and SmilingWolf pick it) goes first. Categories other than character and rating (a few taggers add
    artist or meta tags) use the general threshold."""
    excluded = {tag_key(tag) for tag in options.exclude_tags}
    chosen = [
        index
        for index, tag in enumerate(tags)
        if tag.category != RATING
        and scores[index] >= (options.character_threshold if tag.category == CHARACTER else options.general_threshold)
        and tag_key(tag.name) not in excluded
    ]
    chosen.sort(key=lambda index: -scores[index])
    ratings = [index for index, tag in enumerate(tags) if tag.category == RATING]
    if options.rating and ratings:
        best = max(ratings, key=lambda index: scores[index])
        if tag_key(tags[best].name) not in excluded:
            chosen.insert(0, best)
    return [shown_name(tags[index].name, options.underscores) for index in chosen]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 BGR in 0-255: the RGB image centred on a white square, resized with bicubic
    filtering as SmilingWolf's demo does (kohya resizes with area averaging; the difference is in the noise)."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def _providers(onnxruntime, device: str) -> tuple[list, str]:
    """onnxruntime's providers for ``device`` (auto, cpu, cuda, cuda:N), and where the model runs, in words."""
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "cpu" or (device == "auto" and not has_cuda):
        note = " (onnxruntime-gpu would use the GPU)" if device == "auto" and _torch_sees_cuda() else ""
        return ["CPUExecutionProvider"], f"cpu{note}"
    if not has_cuda:
        raise ModelLoadError.at(
            f"--device {device}",
            "this onnxruntime has no CUDA provider; install onnxruntime-gpu instead of onnxruntime, or use cpu",
        )
    index = int(device.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Tagger:
    """``caption`` gives each image its tags; loading checks that the model and the tags file fit."""

    def __init__(self, folder: Path, options: TaggerOptions, device: str = "auto", batch_size: int = 8) -> None:
        onnxruntime = import_optional("onnxruntime", feature=FEATURE)
        self.options = options
        self.tags = read_tags(folder / TAGS_FILE)
        providers, self.device = _providers(onnxruntime, device)
        model_path = folder / MODEL_FILE
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), providers=providers)
        except Exception as error:  # onnxruntime's own errors (Fail, InvalidProtobuf, ...) share no narrower base
            raise ModelLoadError.at(
                model_path, f"onnxruntime cannot load it ({error}); copy the model again, or update onnxruntime"
            ) from None
        model_input, model_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        batch, height, width, channels = (list(model_input.shape) + [None] * 4)[:4]
        if len(model_input.shape) != 4 or channels != 3 or not isinstance(height, int) or height != width:
            raise ModelLoadError.at(
                model_path,
                f"takes input of shape {model_input.shape}, not a batch of square BGR images (N, size, size, 3) "
                "as WD14 taggers do; give a WD14-style tagger folder",
            )
        outputs = model_output.shape[-1] if model_output.shape else None
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise ModelLoadError.at(
                folder,
                f"{MODEL_FILE} scores {outputs} tags but {TAGS_FILE} lists {len(self.tags)}; "
                "the two files come from different models: use the tags file that came with this model",
            )
        self.input_name, self.output_name, self.size = model_input.name, model_output.name, height
        # Some exported taggers have a fixed batch size; then every call takes exactly that many images.
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.batch_size = self.fixed_batch or batch_size
        self.description = f"WD14-style tagger {folder} ({len(self.tags)} tags, {self.size} px, on {self.device})"

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), tags) sigmoid scores."""
        batch = np.stack([prepare_image(image, self.size) for image in images])
        if self.fixed_batch and len(images) < self.fixed_batch:  # the last batch, padded with its first image
            batch = np.concatenate([batch, np.repeat(batch[:1], self.fixed_batch - len(images), axis=0)])
        return self.session.run([self.output_name], {self.input_name: batch})[0][: len(images)]

    def caption(self, images: list[Image.Image]) -> list[list[str]]:
        """Each image's tags, most confident first."""
        return [select_tags(scores, self.tags, self.options) for scores in self.scores(images)]
