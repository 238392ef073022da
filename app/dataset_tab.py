"""The Dataset tab: the dataset as a run sees it, as thumbnails and a table, and the tools to fix it in place.

It shows the dataset the Configure form describes (every subset) or a folder typed into the tab, scanned as
a run scans it (``app.dataset_rows``); an image selected in the gallery or the table gets its caption edited,
saved, excluded or restored (``app.dataset_files``), and the "Caption images" panel (``app.captioning``)
captions the whole dataset, the images shown or the selected one. Every action scans again and shows the
result, so what is on screen is what is on disk. As elsewhere in the studio nothing is kept between events:
each handler gets the folder, the filters, the selected file and the form's values from the page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from trainer.config.parsing import from_dict, resolve_paths
from trainer.config.schema import TrainConfig
from trainer.data.subsets import SubsetFolder
from trainer.errors import StudioError
from trainer.training.dataset_config import check_configured, scan_configured, subset_folders

from . import dataset_files
from .captioning import SCOPES, caption_form_dataset, caption_panel
from .dataset_rows import COLUMNS, DatasetRow, dataset_rows, filter_rows, problem_counts, table, tag_summary, view_root
from .form import settings_from_form
from .problems import error_box
from .thumbnails import Thumbnails

DATASET_SECTIONS = ("dataset", "training", "validation")
ALL_IMAGES = ("all images", "")
TRACK_TQDM = gr.Progress(track_tqdm=True)


@dataclass
class Inputs:
    """What every handler gets from the page, in this order: the folder box, the filters, the selected file
    and its caption box, then the Configure form's values."""

    folder: str
    tag: str
    kind: str
    selected: str
    text: str
    form: Sequence[Any]

    @classmethod
    def of(cls, values: Sequence[Any]) -> Inputs:
        folder, tag, kind, selected, text = (value or "" for value in values[:5])
        return cls(folder, tag, kind, selected, text, values[5:])

    def settings(self) -> dict[str, dict[str, Any]]:
        """The dataset's settings: the form's, every subset included, when the folder box is empty or holds
        the form's dataset.path; else the box's folder alone, read with the form's dataset settings."""
        settings, _ = settings_from_form(list(self.form))
        sections = resolve_paths({name: settings[name] for name in DATASET_SECTIONS}, Path.cwd())
        folder, form_path = self.folder.strip(), sections["dataset"].get("path", "")
        if folder and not (form_path and Path(form_path).resolve() == Path(folder).expanduser().resolve()):
            sections["dataset"] |= {"path": str(Path(folder).expanduser().resolve()), "subsets": []}
            sections["dataset"]["regularization_path"] = ""
            sections["validation"] |= {"path": ""}
        return sections

    def config(self) -> TrainConfig:
        return from_dict(self.settings(), where="form")

    def image(self, config: TrainConfig, name: str | None = None) -> tuple[Path, SubsetFolder]:
        """The selected image (or ``name``) and its subset, checked to lie inside the dataset's folders."""
        subsets = subset_folders(config)
        return dataset_files.chosen_image(subsets, view_root(subsets), self.selected if name is None else name)

    def files(self, names: list[str]) -> list[Path]:
        """The files the page names, each checked to lie inside the dataset's folders."""
        subsets = subset_folders(self.config())
        return [dataset_files.dataset_file(subsets, view_root(subsets), name)[0] for name in names]


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(text for text in texts if text)


def _moved(image: Path, to: Path) -> tuple[Path, str]:
    return to, f"Moved {image.name} to {to.parent}."


class DatasetTab:
    """The tab's handlers, with the runs folder's thumbnail cache."""

    def __init__(self, runs_dir: Path) -> None:
        self.thumbnails = Thumbnails(runs_dir)

    def _gallery(self, rows: list[DatasetRow]) -> list[tuple[str, str]]:
        previews = self.thumbnails.many([row.path for row in rows if row.previewable])
        shown = iter(previews)
        gallery = []
        for row in rows:
            thumbnail, reason = next(shown) if row.previewable else (self.thumbnails.placeholder(), "")
            role = "" if row.role == "train" else f" ({row.role})"
            text = reason or row.caption or "; ".join(row.problem_lines()) or "(no caption)"
            gallery.append((str(thumbnail), f"{row.path.name}{role}: {text}"))
        return gallery

    def _view(self, inputs: Inputs, note: str = "") -> list[Any]:
        """Message, gallery, table, tag summary and problem filter for the dataset, scanned now."""
        try:
            config = inputs.config()
            scan = scan_configured(config)
        except StudioError as error:
            empty = pd.DataFrame([], columns=COLUMNS)
            message = _paragraphs(note, error_box(error.problems))
            return [message, [], empty, "", gr.Dropdown(choices=[ALL_IMAGES], value="")]
        report = check_configured(config, scan)
        rows = dataset_rows(scan, report)
        shown = filter_rows(rows, inputs.tag, inputs.kind)
        root = view_root(scan.subsets)
        roles = ", ".join(f"{count} {role}" for role, count in Counter(row.role for row in rows).items())
        listed = {row.path for row in rows}
        others = sum(p.kind in ("not_used", "orphan_caption") and p.path not in listed for p in report.other_files)
        message = f"**{root}**: {roles}; showing {len(shown)}." + (
            f" {others} other files are not used (Check dataset on Configure names them)." if others else ""
        )
        counts = problem_counts(rows)
        choices = [ALL_IMAGES, (f"any problem ({sum(1 for row in rows if row.problems)})", "*")]
        choices += [(f"{kind} ({count})", kind) for kind, count in sorted(counts.items())]
        return [
            _paragraphs(note, message),
            self._gallery(shown),
            pd.DataFrame(table(shown, root), columns=COLUMNS),
            tag_summary(report),
            gr.Dropdown(choices=choices, value=inputs.kind if inputs.kind in {"", "*", *counts} else ""),
        ]

    def open(self, *values: Any) -> list[Any]:
        return self._view(Inputs.of(values))

    def enter(self, *values: Any) -> list[Any]:
        """On opening the tab: the form's dataset the first time (empty folder box); after that, as it was."""
        inputs = Inputs.of(values)
        if inputs.folder:
            return [gr.skip()] * 6
        inputs.folder = inputs.settings()["dataset"].get("path", "")
        return [inputs.folder, *self._view(inputs)]

    def select(self, event: gr.SelectData, shown: pd.DataFrame, *values: Any) -> list[Any]:
        """An image clicked in the gallery or the table: its name, its caption file's text and what is known."""
        index = event.index if isinstance(event.index, int) else event.index[0]
        if event.row_value:  # a table row, as shown (the table may be sorted on the page)
            row = dict(zip(COLUMNS, event.row_value))
        elif shown is not None and 0 <= index < len(shown):  # a gallery tile: the table's row in page order
            row = shown.iloc[index].to_dict()
        else:
            return [gr.skip()] * 3
        inputs = Inputs.of(values)
        try:
            image, subset = inputs.image(inputs.config(), str(row["file"]))
        except StudioError as error:
            return ["", "", error_box(error.problems)]
        text, note = dataset_files.caption_text(image, subset)
        facts = f"**{row['file']}** · {row['role']} · {row['repeats']} repeats" + (
            f" · bucket {row['bucket']}" if row["bucket"] else ""
        )
        problems = "".join(f"\n- {line}" for line in str(row["problems"]).splitlines())
        return [row["file"], text, "\n\n".join(part for part in (facts + problems, note) if part)]

    def _act(self, values: Sequence[Any], change: Callable[[Path, SubsetFolder, str], tuple[Path, str]]) -> list[Any]:
        """``change`` the selected image (given its caption box), then the view scanned again and the edit area
        on the image where it now is. ``change`` returns that path and what it did."""
        inputs = Inputs.of(values)
        try:
            config = inputs.config()
            image, subset = inputs.image(config)
            now, note = change(image, subset, inputs.text)
        except StudioError as error:
            return [error_box(error.problems)] + [gr.skip()] * 7
        name = now.relative_to(view_root(subset_folders(config))).as_posix()
        return [*self._view(inputs, note), name, dataset_files.caption_text(now, subset)[0], ""]

    def save(self, *values: Any) -> list[Any]:
        return self._act(values, lambda image, subset, text: (image, dataset_files.save_caption(image, subset, text)))

    def exclude(self, *values: Any) -> list[Any]:
        return self._act(values, lambda image, subset, _: _moved(image, dataset_files.exclude(image, subset)))

    def restore(self, *values: Any) -> list[Any]:
        return self._act(values, lambda image, subset, _: _moved(image, dataset_files.restore(image, subset)))

    def caption(self, shown: pd.DataFrame, scope: str, *values: Any) -> list[Any]:
        """Caption the scope's images with the panel's options (``values``: the five options, then ``Inputs``)."""
        options, inputs = values[:5], Inputs.of(values[5:])
        whole, _, one = SCOPES
        names = [inputs.selected] if scope == one else [] if shown is None else [str(name) for name in shown["file"]]
        try:
            images = None if scope == whole else inputs.files(names)
        except StudioError as error:
            return [error_box(error.problems)] + [gr.skip()] * 4
        report = caption_form_dataset(inputs.settings(), *options, images=images)
        return self._view(inputs, f"```\n{report}\n```")


def dataset_tab(runs_dir: Path, form: list[gr.components.Component], tab: gr.Tab) -> None:
    """The tab's components and events; call inside ``with gr.Tab(...) as tab``, after the form is built."""
    handlers = DatasetTab(runs_dir)
    with gr.Row():
        folder = gr.Textbox(
            label="folder to show",
            info="empty or the form's dataset.path: the Configure form's dataset, every subset; another folder: "
            "that folder alone, with the form's dataset settings",
            scale=4,
        )
        open_button = gr.Button("Open", scale=1)
    with gr.Row():
        tag = gr.Textbox(label="filter by tag", info="part of a comma-separated tag, any letter case")
        kind = gr.Dropdown(label="filter by problem", choices=[ALL_IMAGES], value="")
    message = gr.Markdown()
    tags = gr.Markdown()
    gallery = gr.Gallery(label="Images (click one to edit it)", columns=8, height=420, object_fit="contain")
    shown = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, max_height=360, label="Images")
    with gr.Row():
        selected = gr.Textbox(label="image", interactive=False, scale=2)
        details = gr.Markdown()
    text = gr.Textbox(
        label="caption", lines=3, info="saved as UTF-8; the old caption stays until the new one is written"
    )
    with gr.Row():
        save = gr.Button("Save caption", variant="primary")
        exclude = gr.Button("Exclude (move into 0_excluded/)")
        restore = gr.Button("Restore")
    panel = caption_panel()
    inputs = [folder, tag, kind, selected, text, *form]
    view = [message, gallery, shown, tags, kind]
    edit = [selected, text, details]

    def caption(progress: gr.Progress = TRACK_TQDM, *values: Any) -> list[Any]:
        """Gradio shows the captioning's progress bar for a ``Progress`` parameter; the handler needs none."""
        return handlers.caption(*values)

    tab.select(handlers.enter, inputs, [folder, *view])
    for trigger in (open_button.click, folder.submit, tag.submit, kind.input):
        trigger(handlers.open, inputs, view)
    gallery.select(handlers.select, [shown, *inputs], edit)
    shown.select(handlers.select, [shown, *inputs], edit)
    save.click(handlers.save, inputs, view + edit)
    exclude.click(handlers.exclude, inputs, view + edit)
    restore.click(handlers.restore, inputs, view + edit)
    panel.run.click(caption, [shown, panel.scope, *panel.fields, *inputs], view)
