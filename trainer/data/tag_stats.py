"""Which tags a dataset's captions use, and which captions run past what SDXL's text encoders read.

A tag on every training image is either the concept's trigger word already or a tag to prune: it teaches
nothing apart. SDXL's CLIP encoders read 77 tokens (a start token, 75 of the caption, an end token); training
cuts the rest off, as the pipeline does.

Tokens are counted without a tokenizer, so check-data needs no model and the data package no model code:
CLIP's BPE first splits text into pieces (runs of letters, single digits, runs of other characters; the
``pat`` regex of openai/CLIP's ``simple_tokenizer.py``, which transformers' ``CLIPTokenizer`` uses too), and
then each piece into one token or more (a common word is one; a rare one several). Counting the pieces is a
lower bound: a caption counted over 75 is surely cut, one under may still be, when it is full of rare words.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .captions import process_caption
from .scan import DatasetScan

CAPTION_TOKENS = 75  # CLIP's 77 less the start and end tokens
TOP_TAGS = 20
# CLIP's pre-tokenizer in Python's re: [^\W\d_]+ is \p{L}+ (letters), \d is \p{N} (one digit), and the last
# group is [^\s\p{L}\p{N}]+ (the underscore is in \w but is no letter); CLIP lowercases first.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
TOKEN_COUNT = "lower bound: CLIP's word pieces, one token or more each"


def clip_token_lower_bound(text: str) -> int:
    """At least how many tokens CLIP's tokenizer gives ``text`` (without the start and end tokens)."""
    return len(_CLIP_PIECES.findall(text.lower()))


@dataclass
class TagStats:
    training_images: int = 0
    most_frequent: list[tuple[str, int]] = field(default_factory=list)  # images per tag, top TOP_TAGS
    on_every_image: list[str] = field(default_factory=list)  # with 2 training images or more
    long_captions: list[tuple[Path, int]] = field(default_factory=list)  # (image, tokens at least) over 75

    def to_json(self) -> dict:
        return {
            "training_images": self.training_images,
            "most_frequent": [{"tag": tag, "images": count} for tag, count in self.most_frequent],
            "on_every_image": self.on_every_image,
            "caption_token_limit": CAPTION_TOKENS,
            "token_count": TOKEN_COUNT,
            "long_captions": [{"path": str(path), "tokens": tokens} for path, tokens in self.long_captions],
        }


def tag_statistics(scan: DatasetScan) -> TagStats:
    """Tags per training image (each counted once per image, split at its subset's ``tag_separator``), and
    every trained or validated caption that is long, as a step sees it: the trigger word in, nothing dropped."""
    training = [item for item in scan.items if item.role == "train"]
    images_per_tag: Counter[str] = Counter()
    for item in training:
        separator = scan.subsets[item.subset].captions.tag_separator
        images_per_tag.update({tag.strip() for tag in item.caption.split(separator) if tag.strip()})
    ranked = sorted(images_per_tag.items(), key=lambda pair: (-pair[1], pair[0]))
    every = [tag for tag, count in ranked if count == len(training)] if len(training) > 1 else []
    long_captions = []
    for item in scan.items + scan.held_out:
        options = scan.subsets[item.subset].captions
        whole = replace(options, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0)
        tokens = clip_token_lower_bound(process_caption(item.caption, whole, random.Random(0)))
        if tokens > CAPTION_TOKENS:
            long_captions.append((item.path, tokens))
    return TagStats(len(training), ranked[:TOP_TAGS], every, long_captions)


def format_tag_stats(stats: TagStats) -> list[str]:
    """check-data's lines for the tags and long captions."""
    lines = [f"most frequent tags (images of {stats.training_images} training images):"]
    lines += [f"  {count:>5}  {tag}" for tag, count in stats.most_frequent] or ["  (no captions)"]
    if stats.on_every_image:
        lines += ["", "on every training image (the trigger word, or tags to prune: they teach nothing apart):"]
        lines.append("  " + ", ".join(stats.on_every_image))
    if stats.long_captions:
        lines += [
            "",
            f"captions over CLIP's 77 tokens ({len(stats.long_captions)}; training cuts them after "
            f"{CAPTION_TOKENS}, tokens counted as a {TOKEN_COUNT}):",
        ]
        lines += [f"  {path}: {tokens} tokens or more" for path, tokens in stats.long_captions]
    else:
        lines += ["", f"no caption over CLIP's 77 tokens (tokens counted as a {TOKEN_COUNT})"]
    return lines
