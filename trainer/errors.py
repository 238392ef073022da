"""One family of errors for everything a user can fix, each carrying the problems it found.

A ``Problem`` names where to look (a setting key such as ``network.rank``, a file, a folder, a command-line
flag) and says what is wrong and what to do, in words meant for the user. An error holds one or more of them,
so the CLI prints them one per line and the studio lists them by setting, and nobody parses a message back
into its parts. Each kind keeps the builtin base it always had (bad input is a ``ValueError``, a run that
cannot go on a ``RuntimeError``), so code that catches those still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any, Self


@dataclass(frozen=True)
class Problem:
    """One thing to fix."""

    where: str  # a setting key, a file or folder, a flag; "" when the problem has no single place
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class StudioError(Exception):
    """The base of the family: ``problems``, found while reading ``context`` (a preset, "form", ...) if given.

    ``str(error)`` is what the CLI prints: the problem alone, or the context and one problem per line.
    """

    def __init__(self, *problems: Problem | str, context: str = "") -> None:
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.context = context
        super().__init__(*self.problems)

    @classmethod
    def at(cls, where: str | PathLike, message: str, **fields: Any) -> Self:
        """The usual case: one problem at one place (``fields``: what a subclass adds, such as ``kind``)."""
        return cls(Problem(str(where), message), **fields)

    def __str__(self) -> str:
        lines = [str(problem) for problem in self.problems]
        if self.context:
            return f"{self.context}:\n  " + "\n  ".join(lines)
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its context (a DataLoader worker or another process may raise it).
        return type(self), tuple(self.problems), self.__dict__


class ConfigError(StudioError, ValueError):
    """Settings that cannot run: each problem names a setting key (or the preset file) and the fix."""


class DatasetError(StudioError, ValueError):
    """A dataset folder with nothing usable in it, or an image that broke during training."""


class ImageLoadError(StudioError, ValueError):
    """One image that cannot be used; ``kind`` ("unreadable", "too_large") is what check-data groups it by."""

    def __init__(self, *problems: Problem | str, context: str = "", kind: str = "unreadable") -> None:
        super().__init__(*problems, context=context)
        self.kind = kind


class ModelLoadError(StudioError, ValueError):
    """A model path that cannot be loaded (missing, pickle, not SDXL, no configs for a single file)."""


class AdapterFileError(StudioError, ValueError):
    """A file that cannot be read or written as an adapter."""


class AdapterMismatchError(StudioError, ValueError):
    """An adapter whose stems or shapes do not fit the model it is merged into."""


class PromptSyntaxError(StudioError, ValueError):
    """A sample prompt line that cannot be read (file:line when it comes from a file)."""


class TrainStateError(StudioError, ValueError):
    """A saved training state that is incomplete, corrupt, or does not fit the run resuming from it."""


class RunNameError(StudioError, ValueError):
    """A run name that could leave the runs folder or is not a plain folder name."""


class UsageError(StudioError, ValueError):
    """Command-line arguments that do not fit together."""


class TrainingError(StudioError, RuntimeError):
    """A run that cannot go on; the last saved adapter and state are kept."""


class MissingPackageError(StudioError, RuntimeError):
    """A chosen feature needs an optional package; the message has the ``pip install`` line."""


class LaunchRefused(StudioError, RuntimeError):
    """A start, resume or command the studio cannot carry out now (another run is training, ...)."""
