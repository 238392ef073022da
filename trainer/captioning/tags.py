"""Tags as text: when two are the same, how a caption shows one, and a caption's tags."""

from __future__ import annotations

# Tags whose underscores are the picture, kept as they are when the others become spaces: the list
# SmilingWolf's demo uses (from toriato's webui tagger). kohya keeps every tag of 3 characters or fewer,
# which covers the short ones; we do both.
KAOMOJI = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
}  # fmt: skip


def tag_key(tag: str) -> str:
    """What makes two tags the same: ``Long_Hair`` is ``long hair``."""
    return " ".join(tag.replace("_", " ").lower().split())


def shown_name(tag: str, underscores: bool) -> str:
    """The tag as a caption writes it: underscores to spaces, unless asked to keep them or it is a kaomoji."""
    if underscores or tag in KAOMOJI or len(tag) <= 3:
        return tag
    return tag.replace("_", " ")


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated parts, stripped, empty ones dropped."""
    return [part.strip() for part in caption.split(",") if part.strip()]
