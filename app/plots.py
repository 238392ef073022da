"""The studio's loss charts: columns for a Gradio ``LinePlot`` whose series are told apart by colour."""

from __future__ import annotations

import pandas as pd

LOSS_COLUMNS = {"step": "int64", "loss": "float64", "series": "string"}


def loss_frame(columns: dict[str, list]) -> pd.DataFrame | None:
    """``step``, ``loss`` and ``series`` columns, typed; None while there is nothing to draw. The plot keeps
    what it learnt from the first frame it is given: an empty one, typed or not, leaves its colour scale
    without series, so every line after it is drawn invisible (seen in chromium with Gradio 6.31)."""
    frame = pd.DataFrame({name: columns.get(name, []) for name in LOSS_COLUMNS}).astype(LOSS_COLUMNS)
    return frame if len(frame) else None
