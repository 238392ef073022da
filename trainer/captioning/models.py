"""Which kind of captioning model a folder holds, by its files, and the model loaded from it.

A WD14-style tagger ships as ``model.onnx`` beside ``selected_tags.csv``; a transformers model as
``config.json`` with its weights and processor files. Each kind's package (onnxruntime, transformers) is
imported only when a folder of that kind is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from trainer.errors import ModelLoadError

from .options import ModelSettings
from .tagger import MODEL_FILE, TAGS_FILE

FOLDER_KINDS = (
    f"a WD14-style tagger ({MODEL_FILE} and {TAGS_FILE}, e.g. SmilingWolf/wd-vit-tagger-v3) or a transformers "
    "image-to-text model (config.json, weights and processor files, e.g. Salesforce/blip-image-captioning-large)"
)


class CaptionModel(Protocol):
    batch_size: int  # images per ``caption`` call
    description: str  # what runs where, for the report

    def caption(self, images: list[Image.Image]) -> list[list[str]]:
        """Each image's caption parts (tags, or one sentence), best first; [] when the model found nothing."""
        ...


def open_caption_model(folder: Path, settings: ModelSettings) -> CaptionModel:
    """The tagger or captioner in ``folder``; ``ModelLoadError`` naming the folder and what it should hold."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a folder"
        raise ModelLoadError.at(folder, f"{what}; give the model's folder: {FOLDER_KINDS}")
    if (folder / MODEL_FILE).is_file() or (folder / TAGS_FILE).is_file():
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError.at(
                folder,
                f"a WD14-style tagger folder needs {MODEL_FILE} and {TAGS_FILE} side by side, and {missing[0]} is "
                "missing; copy it from the model's download (both files come with every WD14 tagger)",
            )
        from .tagger import Tagger

        return Tagger(folder, settings.tagger, settings.device, settings.batch_size)
    if (folder / "config.json").is_file():
        from .captioner import Captioner

        return Captioner(folder, settings.captioner, settings.device, settings.batch_size)
    raise ModelLoadError.at(folder, f"holds no captioning model; give {FOLDER_KINDS}")
