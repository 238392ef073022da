"""Serving the studio page (``dora-studio ui``): what is reachable, and nothing else on disk, shared or logged."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .theme import THEME
from .ui import build


def launch(
    runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None, block: bool = True
) -> gr.Blocks:
    """Serve the studio. Run files are served in place from the runs folder (static path: no copies into
    Gradio's cache) and nothing else on disk is reachable; no share link, analytics or run history."""
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    gr.set_static_paths([runs_dir])
    demo = build(runs_dir)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        show_error=True,
        ssr_mode=False,
        prevent_thread_lock=not block,
        theme=THEME,
        footer_links=[],
        run_history=False,
        enable_monitoring=False,
        max_file_size="1mb",
        quiet=True,
    )
    return demo


def serve(runs_dir: Path, host: str, port: int, auth: tuple[str, str] | None) -> None:
    """``dora-studio ui``: print where to look, then serve until interrupted."""
    print(
        f"DoRA Studio on http://{host}:{port} (runs in {Path(runs_dir).resolve()}); Ctrl-C to quit. "
        "Training runs in its own process and goes on if the UI stops.",
        flush=True,
    )
    launch(runs_dir, host, port, auth, block=True)
