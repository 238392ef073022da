"""How to run a captioning model: each kind's options, and what both share. Plain values, no imports of
model code, so the CLI and the studio build them before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field

# missing: only images without a caption; overwrite: every image; append: add the new tags to existing captions
MODES = ("missing", "overwrite", "append")


@dataclass(frozen=True)
class TaggerOptions:
    general_threshold: float = 0.35  # SmilingWolf's and kohya's defaults
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()  # compared without regard to case or underscores
    underscores: bool = False  # keep tags as the CSV writes them (long_hair); default: long hair
    rating: bool = False  # add the most likely rating tag (general, sensitive, ...) first


@dataclass(frozen=True)
class CaptionerOptions:
    prompt: str = ""  # the caption's start (BLIP: "a photography of"), or the task (Florence-2: "<CAPTION>")
    max_length: int = 75  # new tokens: about what fits CLIP's 77
    beams: int = 1  # beam search when over 1
    sample: bool = False  # nucleus sampling instead of the most likely words
    top_p: float = 0.9


@dataclass(frozen=True)
class ModelSettings:
    """How to run whichever kind the folder holds; each kind reads its own options."""

    tagger: TaggerOptions = field(default_factory=TaggerOptions)
    captioner: CaptionerOptions = field(default_factory=CaptionerOptions)
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:1, ...
    batch_size: int = 8
