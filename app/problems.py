"""How the studio shows what to fix: the ``Problem``s a ``StudioError`` carries, one bullet each, where it happened."""

from __future__ import annotations

from trainer.errors import Problem


def error_box(problems: list[Problem]) -> str:
    """One bullet per problem, its setting or file first."""
    return "**Please fix:**\n" + "\n".join(
        f"- `{p.where}`: {p.message}" if p.where else f"- {p.message}" for p in problems
    )
