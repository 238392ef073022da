"""The Compare tab: pick two or more runs; see the settings that differ, the loss curves on one chart, and
the same prompt at the same sampling side by side (``compare``). It builds and wires itself, so the studio's
layout names it in one line."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from trainer.errors import StudioError
from trainer.runs.run_directory import RunDirectory

from .compare import loss_curves_of, sampling_labels, settings_difference, side_by_side
from .plots import loss_frame
from .runs import list_runs, prompt_choices, read_samples

MIN_RUNS = 2


def _chosen(runs_dir: Path, names: list[str] | None) -> list[Path]:
    """The runs the browser named, each checked to be a run folder under ``runs_dir``."""
    found = []
    for name in names or []:
        try:
            found.append(RunDirectory.named(runs_dir, name).root)
        except StudioError:
            continue  # deleted or renamed since the list was drawn
    return [root for root in found if root.is_dir()]


def compare_runs(runs_dir: Path, names: list[str] | None):
    """The settings table, the loss chart and the choices of prompt and sampling for the chosen runs."""
    runs = _chosen(runs_dir, names)
    if len(runs) < MIN_RUNS:
        return "Choose two or more runs.", None, loss_frame({}), gr.Dropdown(choices=[]), gr.Dropdown(choices=[])
    header, rows = settings_difference(runs)
    table = pd.DataFrame(rows, columns=header) if rows else None
    note = (
        f"{len(rows)} {'setting differs' if len(rows) == 1 else 'settings differ'}." if rows else "The same settings."
    )
    curves = loss_frame(loss_curves_of(runs))
    prompts = prompt_choices(read_samples(runs[0]))
    samplings = sampling_labels(runs)
    return (
        note,
        table,
        curves,
        gr.Dropdown(choices=prompts, value=prompts[0][1] if prompts else None),
        gr.Dropdown(choices=samplings, value=samplings[-1] if samplings else None),
    )


def compare_samples(runs_dir: Path, names: list[str] | None, prompt: str | None, sampling: str | None):
    if prompt is None or not sampling:
        return []
    pairs = side_by_side(_chosen(runs_dir, names), int(prompt), sampling)
    return [(str(sample.path), f"{run} · {sampling}") for sample, run in pairs]


def compare_tab(runs_dir: Path) -> None:
    """The tab's components and events; call inside a ``gr.Tab`` of the studio's ``gr.Blocks``."""
    runs = gr.Dropdown(label="Runs to compare", multiselect=True, choices=[])
    note = gr.Markdown()
    table = gr.Dataframe(label="Settings that differ", interactive=False, wrap=True)
    curves = gr.LinePlot(x="step", y="loss", color="series", x_axis_format="d", label="Loss (smoothed)", height=340)
    with gr.Row():
        prompt = gr.Dropdown(label="Prompt", choices=[])
        sampling = gr.Dropdown(label="Sampling", choices=[])
    images = gr.Gallery(label="The same prompt, side by side", columns=4, height="auto", object_fit="contain")

    listed = gr.Button("Refresh the list of runs", size="sm")
    listed.click(lambda: gr.Dropdown(choices=[run.name for run in list_runs(runs_dir)]), None, runs)
    runs.change(lambda names: compare_runs(runs_dir, names), runs, [note, table, curves, prompt, sampling])
    for source in (prompt, sampling):
        source.change(lambda names, p, s: compare_samples(runs_dir, names, p, s), [runs, prompt, sampling], images)
