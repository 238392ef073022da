"""Per-step caption variation, as kohya sd-scripts does it (``BaseDataset.process_caption``).

A caption is a list of tags split on ``tag_separator``. The trigger word goes first; the first
``keep_tokens`` tags stay put, the rest may be shuffled and dropped one by one; caption dropout blanks
the whole caption. Randomness comes only from the ``rng`` passed in, so a seed reproduces a run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    trigger_word: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags never shuffled or dropped; the trigger word counts as one
    caption_dropout: float = 0.0  # probability the whole caption becomes "" (unconditional step)
    tag_dropout: float = 0.0  # probability each tag after the kept ones is dropped
    tag_separator: str = ","

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "tag_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")
        if not self.tag_separator:
            raise ValueError("tag_separator must not be empty")


def is_randomised(options: CaptionOptions) -> bool:
    """Whether captions can differ between epochs, so text-encoder outputs cannot be cached.

    Mirrors kohya's ``is_text_encoder_output_cacheable`` (shuffle or either dropout rules caching out).
    """
    return options.shuffle_tags or options.caption_dropout > 0 or options.tag_dropout > 0


def _with_trigger(caption: str, options: CaptionOptions) -> str:
    """The trigger word as the first tag, unless the caption already starts with it as a whole word."""
    trigger = options.trigger_word.strip()
    if not trigger:
        return caption
    starts_with_trigger = re.match(rf"{re.escape(trigger)}(?=$|\s|{re.escape(options.tag_separator)})", caption)
    if starts_with_trigger:
        return caption
    return f"{trigger}{_joiner(options.tag_separator)}{caption}" if caption else trigger


def _joiner(separator: str) -> str:
    """kohya always joins with ", "; we keep the user's separator, followed by a space unless it is one."""
    return separator if separator.isspace() else f"{separator} "


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """The caption one training step sees.

    As in kohya, caption dropout is decided first and gives "" outright: kohya adds its caption prefix
    before dropping, so a dropped step trains unconditionally, trigger word included. The rng draws come
    in kohya's order (dropout, shuffle, per-tag dropout), and only for options that are on.
    """
    caption = _with_trigger(caption, options)
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    if not (options.shuffle_tags or options.tag_dropout > 0):
        return caption  # kohya leaves the text untouched unless it has to split it
    tags = [tag.strip() for tag in caption.split(options.tag_separator)]
    tags = [tag for tag in tags if tag]  # "a, b," has two tags, not three (kohya would keep an empty one)
    kept, free = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.shuffle_tags:
        rng.shuffle(free)
    if options.tag_dropout > 0:
        free = [tag for tag in free if rng.random() >= options.tag_dropout]
    return _joiner(options.tag_separator).join(kept + free)
