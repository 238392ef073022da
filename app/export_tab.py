"""The Export tab's handlers: the run's adapters, one chosen by the browser's name for it, and what is done
with it (``export``: inspect, verify, analyze, resize and convert). A part of ``ui.Studio``, kept apart so the
studio's module stays one screenful per tab."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.runs.run_directory import RunDirectory

from .export import adapter_summary, analyze_run, make_from_adapter, verify_adapter
from .runs import read_adapters


class ExportHandlers:
    """Mixed into ``ui.Studio``, which provides ``_run(name) -> RunDirectory``."""

    def _run(self, name: str) -> RunDirectory:
        raise NotImplementedError

    @staticmethod
    def _adapter_choices(run_dir: Path) -> list[str]:
        return [path.name for path in read_adapters(run_dir)]

    def _adapter(self, name: str | None, adapter: str | None) -> tuple[RunDirectory, Path] | None:
        """The run and one of its adapter files, as the browser names them; None unless both exist."""
        if not name or not adapter:
            return None
        run = self._run(name)
        path = run.adapters_dir / adapter
        return (run, path) if path.parent == run.adapters_dir and path.is_file() and "/" not in adapter else None

    def show_adapter(self, name: str | None, adapter: str | None):
        found = self._adapter(name, adapter)
        if found is None:
            return "", gr.DownloadButton(visible=False), ""
        run, path = found
        return (
            adapter_summary(path),
            gr.DownloadButton(value=str(path), visible=True),
            verify_adapter(run, path, now=False),
        )

    def verify(self, name: str | None, adapter: str | None) -> str:
        found = self._adapter(name, adapter)
        return verify_adapter(*found, now=True) if found else "Choose an adapter first."

    def make_file(self, name: str | None, adapter: str | None, tool: str, rank: float | None):
        """Resize or convert the chosen adapter (``export.make_from_adapter``): the report, and the new file."""
        found = self._adapter(name, adapter)
        text, out = (
            make_from_adapter(*found, tool, int(rank) if rank else None)
            if found
            else ("Choose an adapter first.", None)
        )
        return text, gr.DownloadButton(value=str(out), visible=True) if out else gr.DownloadButton(visible=False)

    def analysis(self, name: str | None, now: bool) -> tuple[str | None, str]:
        """The run's ΔM-against-ΔD plot and per-block text (``dora-studio analyze --run``); ``now``: analyze first."""
        return analyze_run(self._run(name), now) if name else (None, "Choose a run first.")
