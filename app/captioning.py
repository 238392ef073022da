"""The Dataset tab's "Caption images" panel: ``dora-studio caption`` over the dataset shown, or some of its images.

It runs in the studio's process and returns when done (a tagger does a few hundred images a minute on a
CPU; its progress bar is the tab's); then the tab scans again, so the new captions can be reviewed and
edited there. The images are the dataset's training and validation images, found as a run finds them (the
whole dataset, or those the tab names); regularization folders are left alone.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.captioning.options import MODES, ModelSettings, TaggerOptions
from trainer.captioning.run import CaptionPlan, caption_scan, format_caption_report
from trainer.config.parsing import from_dict
from trainer.errors import StudioError
from trainer.training.dataset_config import scan_configured

SCOPES = ("the whole dataset", "the images shown", "the selected image")


@dataclass
class CaptionPanel:
    fields: list[gr.components.Component]  # caption_form_dataset's options, in its order
    scope: gr.Radio  # one of SCOPES: which images the tab asks for
    run: gr.Button


def caption_panel() -> CaptionPanel:
    """The collapsed panel; its fields feed ``caption_form_dataset``."""
    with gr.Accordion("Caption images", open=False):
        model = gr.Textbox(
            label="model folder",
            info="on this machine: a WD14-style tagger (model.onnx and selected_tags.csv) or a transformers "
            "image-to-text model (BLIP, GIT, Florence-2, ...)",
        )
        mode = gr.Radio(
            list(MODES),
            value="missing",
            label="mode",
            info="missing: only images without a caption; overwrite: every image; append: add the new tags",
        )
        with gr.Row():
            general = gr.Slider(0, 1, value=0.35, step=0.01, label="general threshold (tagger)")
            character = gr.Slider(0, 1, value=0.85, step=0.01, label="character threshold (tagger)")
            trigger = gr.Textbox(label="trigger word", info="first in every caption (optional)")
        scope = gr.Radio(list(SCOPES), value=SCOPES[0], label="caption")
        run = gr.Button("Caption images")
    return CaptionPanel([model, mode, general, character, trigger], scope, run)


def caption_form_dataset(
    settings: dict[str, Any],
    model_folder: str,
    mode: str,
    general: float,
    character: float,
    trigger: str,
    images: Collection[Path] | None = None,
) -> str:
    """Caption the dataset the ``settings`` describe (``images``: only those of its images); what
    ``dora-studio caption`` prints, or the problems."""
    if not model_folder.strip():
        return "Give the model folder first."
    try:
        config = from_dict({name: settings[name] for name in ("dataset", "training", "validation")}, where="form")
        report = caption_scan(
            scan_configured(config),
            Path(model_folder.strip()),
            ModelSettings(tagger=TaggerOptions(float(general), float(character))),
            CaptionPlan(mode, trigger.strip()),
            images=images,
        )
    except StudioError as error:
        return "\n".join(str(problem) for problem in error.problems)
    return format_caption_report(report)
