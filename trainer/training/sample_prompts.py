"""Sample prompts in kohya sd-scripts' line syntax, so prompt files written for kohya work here unchanged.

A line is ``a cat on a sofa --n blurry, lowres --w 1024 --h 768 --s 28 --l 7.5 --d 42``. As in kohya's
``line_to_prompt_dict``, the line is split on " --": the first piece is the prompt, every later piece is
one option, a name (case-insensitive) then its value, so a value (the negative prompt too) runs to the
next " --" and may hold commas and spaces. Where kohya silently ignores what it cannot read (an unknown
option, ``--w 1000px``, a misspelt name), we refuse with the line and the fix: a silently dropped option
only shows up as a wrong sample hours into a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import PromptSyntaxError

SUPPORTED_OPTIONS = {
    "n": "negative prompt",
    "w": "width",
    "h": "height",
    "s": "sampling steps",
    "l": "CFG guidance scale",
    "d": "seed",
}
# Options kohya's trainers (train_util) or its generator (gen_img.py) read that we do not: named in the
# error so that a copied kohya file fails with "not supported", not with "unknown option".
KOHYA_ONLY_OPTIONS = {
    "ss": "sampler",
    "g": "embedded guidance scale",
    "cn": "ControlNet image",
    "ctr": "CFG truncation ratio",
    "rcfg": "renormalized CFG",
    "fs": "flow shift",
    "nl": "negative scale",
    "t": "img2img strength",
    "c": "CLIP prompt",
    "am": "network multipliers",
    "f": "file name",
    "ow": "original width",
    "oh": "original height",
    "nw": "negative original width",
    "nh": "negative original height",
    "ct": "crop top",
    "cl": "crop left",
    "dsd1": "Deep Shrink",
    "dst1": "Deep Shrink",
    "dsd2": "Deep Shrink",
    "dst2": "Deep Shrink",
    "dsr": "Deep Shrink",
    "glt": "Gradual Latent",
    "glr": "Gradual Latent",
    "gle": "Gradual Latent",
    "gls": "Gradual Latent",
    "glsn": "Gradual Latent",
    "glus": "Gradual Latent",
}
MAX_STEPS = 1000  # kohya's ceiling too; it clamps silently, we refuse
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
_SUPPORTED_LIST = ", ".join(f"--{name} ({meaning})" for name, meaning in SUPPORTED_OPTIONS.items())


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt; a None setting means the caller's default (``trainer.training.sampling.SampleDefaults``)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--{name} ({SUPPORTED_OPTIONS[name]}) needs a whole number, got {text!r}") from None


def _size(name: str, text: str) -> int:
    """A positive multiple of 8, the VAE's factor.

    kohya rounds a bad size down to a multiple of 8 (at least 64) without a word; we refuse and name
    the nearest multiple instead, so that the size the user reads in the file is the size they get.
    """
    value = _int(name, text)
    if value <= 0 or value % 8:
        nearest = max(8, (value + 4) // 8 * 8)
        raise ValueError(
            f"--{name} ({SUPPORTED_OPTIONS[name]}) must be a positive multiple of 8, got {value}; "
            f"use --{name} {nearest}"
        )
    return value


def _steps(text: str) -> int:
    value = _int("s", text)
    if not 1 <= value <= MAX_STEPS:
        raise ValueError(f"--s (sampling steps) must be between 1 and {MAX_STEPS}, got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--l (CFG guidance scale) needs a number >= 0 such as 7.5, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _int("d", text)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"--d (seed) must be between 0 and 2**64-1, got {value}; leave --d out for the default seed")
    return value


_FIELDS = {
    "n": ("negative_prompt", str),
    "w": ("width", lambda text: _size("w", text)),
    "h": ("height", lambda text: _size("h", text)),
    "s": ("steps", _steps),
    "l": ("guidance_scale", _guidance),
    "d": ("seed", _seed),
}


def _option(piece: str) -> tuple[str, str, str]:
    """(name, field, raw value) of one " --" piece, refusing names we do not read."""
    if not piece[:1].strip():
        raise ValueError(
            f"' --' starts an option, so it must be followed by an option name ({_SUPPORTED_LIST}); "
            "the prompt itself cannot contain ' --'"
        )
    name, _, value = piece.rstrip().partition(" ")
    name, value = name.lower(), value.strip()
    if name in KOHYA_ONLY_OPTIONS:
        raise ValueError(
            f"--{name} ({KOHYA_ONLY_OPTIONS[name]}) is a kohya option this trainer does not support; "
            f"remove it. Supported: {_SUPPORTED_LIST}"
        )
    if name not in _FIELDS:
        raise ValueError(f"unknown option --{name}; supported: {_SUPPORTED_LIST}")
    if not value:
        raise ValueError(f"--{name} ({SUPPORTED_OPTIONS[name]}) needs a value after it")
    return name, _FIELDS[name][0], value


def parse_prompt_line(line: str) -> SamplePrompt:
    """Read one kohya-style prompt line; raise PromptSyntaxError naming the line and the fix.

    Unlike kohya (which scans the prompt piece for options too, and lets a repeated option win last),
    only the pieces after the first " --" are options and each may appear once.
    """
    # The leading space makes a line that starts with "--w" options with no prompt (refused), not a prompt.
    prompt, *pieces = (" " + line.strip()).split(" --")
    values: dict[str, object] = {}
    try:
        if not prompt.strip():
            raise ValueError("there is no prompt text before the first option")
        for piece in pieces:
            name, field, raw = _option(piece)
            if field in values:
                raise ValueError(f"--{name} ({SUPPORTED_OPTIONS[name]}) is given twice; keep one")
            values[field] = _FIELDS[name][1](raw)
    except ValueError as error:
        raise PromptSyntaxError(f"{error} (in prompt line {line.strip()!r})") from None
    return SamplePrompt(prompt=prompt.strip(), **values)


def read_prompt_file(path: Path) -> list[SamplePrompt]:
    """Prompts of a UTF-8 text file (a BOM is fine), one a line; blank lines and '#' comments skipped.

    kohya also reads .toml and .json prompt files; those are refused by suffix rather than misread as lines.
    """
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise PromptSyntaxError.at(
            path, f"{path.suffix} prompt files are not supported; write one prompt per line in a .txt file"
        )
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        # kohya skips only a '#' in the first column; an indented comment is still a comment here.
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            prompts.append(parse_prompt_line(line))
        except PromptSyntaxError as error:
            raise PromptSyntaxError.at(f"{path}:{number}", str(error)) from None
    return prompts
