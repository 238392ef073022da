"""The Configure form, generated from the trainer's settings schema so the two cannot drift apart.

Each schema field becomes one component (checkbox, dropdown, number or text box) labelled with its key
and described by its help text; advanced fields go into one collapsed "Advanced" section. The form's
values travel as a flat list in ``FORM_KEYS`` order, which is how Gradio hands inputs to handlers.
"""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any, get_args, get_origin

import gradio as gr
import tomli_w

from trainer.config.parsing import from_dict, to_dict
from trainer.config.schema import SECTIONS, TrainConfig, field_type, fields_of, table_class
from trainer.errors import ConfigError, Problem

SECTION_TITLES = {
    "model": "Model",
    "dataset": "Dataset",
    "network": "Network",
    "optimizer": "Optimizer",
    "training": "Training",
    "validation": "Validation",
    "sampling": "Sampling",
    "saving": "Saving",
}
FORM_KEYS: list[str] = [f"{section}.{spec.name}" for section, cls in SECTIONS.items() for spec in fields_of(cls)]


def _spec(key: str) -> tuple[dataclasses.Field, Any]:
    section, _, name = key.partition(".")
    cls = SECTIONS[section]
    return next(f for f in fields_of(cls) if f.name == name), field_type(cls, name)


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list


def _is_table_list(annotation: Any) -> bool:
    """A list of settings tables (dataset.subsets), edited as TOML text: one [[name]] table each."""
    return table_class(annotation) is not None


def _component(key: str, value: Any) -> gr.components.Component:
    """One field showing ``value`` as ``form_values`` gives it (lists already as text)."""
    spec, annotation = _spec(key)
    meta = spec.metadata
    label, info = key.partition(".")[2], meta["help"]
    if annotation is bool:
        return gr.Checkbox(value=value, label=label, info=info)
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, label=label, info=info)
    if annotation is int:
        return gr.Number(
            value=value, label=label, info=info, precision=0, minimum=meta["minimum"], maximum=meta["maximum"]
        )
    if annotation in (float, float | None):
        return gr.Number(value=value, label=label, info=info + (" (blank: unset)" if value is None else ""))
    if _is_table_list(annotation):
        return gr.Code(value=value, label=label, language=None, lines=6, interactive=True)
    if _is_list(annotation):
        separator = "one per line" if get_args(annotation)[0] is str else "comma-separated"
        return gr.Textbox(
            value=value,
            label=label,
            info=f"{info} ({separator})",  # value: form_values' text
            lines=3 if get_args(annotation)[0] is str else 1,
        )
    return gr.Textbox(value=value, label=label, info=info)


def _list_to_text(values: list, annotation: Any, name: str = "") -> str:
    if _is_table_list(annotation):
        return tomli_w.dumps({name: values}) if values else ""
    return "\n".join(values) if get_args(annotation)[0] is str else ", ".join(str(v) for v in values)


def _text_to_list(text: str, annotation: Any, name: str = "") -> list:
    if _is_table_list(annotation):
        return tomllib.loads(text or "").get(name, [])
    if get_args(annotation)[0] is str:
        return [line.strip() for line in (text or "").splitlines() if line.strip()]
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    return [float(item) for item in items]


def build_form(config: TrainConfig) -> dict[str, gr.components.Component]:
    """Key -> component, in FORM_KEYS order; call inside a ``gr.Blocks`` context."""
    values = form_values(config)
    components: dict[str, gr.components.Component] = {}
    advanced = {key for key in FORM_KEYS if _spec(key)[0].metadata["advanced"]}
    for section, title in SECTION_TITLES.items():
        with gr.Accordion(title, open=section in ("model", "dataset", "network")):
            for key in FORM_KEYS:
                if key.startswith(section + ".") and key not in advanced:
                    components[key] = _component(key, values[FORM_KEYS.index(key)])
    with gr.Accordion("Advanced", open=False):
        for section, title in SECTION_TITLES.items():
            keys = [key for key in FORM_KEYS if key.startswith(section + ".") and key in advanced]
            if keys:
                gr.Markdown(f"**{title}**")
                for key in keys:
                    components[key] = _component(key, values[FORM_KEYS.index(key)])
    return {key: components[key] for key in FORM_KEYS}


def form_values(config: TrainConfig) -> list[Any]:
    """The config as the form shows it, in FORM_KEYS order."""
    data, plain = dataclasses.asdict(config), to_dict(config)
    shown = []
    for key in FORM_KEYS:
        section, _, name = key.partition(".")
        annotation = _spec(key)[1]
        if _is_list(annotation):
            shown.append(_list_to_text(plain[section][name], annotation, name))
        else:
            shown.append(data[section][name])
    return shown


def settings_from_form(values: list[Any]) -> tuple[dict, list[Problem]]:
    """Nested settings from the form's values, plus problems found while converting (e.g. 8.5 for an int)."""
    settings: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    problems = []
    for key, value in zip(FORM_KEYS, values):
        section, _, name = key.partition(".")
        annotation = _spec(key)[1]
        if _is_list(annotation):
            try:
                value = _text_to_list(value, annotation, name)
            except tomllib.TOMLDecodeError as error:
                problems.append(Problem(key, f"not valid TOML ([[{name}]] tables): {error}"))
                continue
            except ValueError:
                problems.append(Problem(key, f"expected numbers separated by commas, got {value!r}"))
                continue
        elif annotation is int and isinstance(value, float):
            if not value.is_integer():
                problems.append(Problem(key, f"expected a whole number, got {value}"))
                continue
            value = int(value)
        elif annotation is str and value is None:
            value = ""
        if value is None and annotation != (float | None):
            problems.append(Problem(key, "required"))
            continue
        if value is not None:
            settings[section][name] = value
    return settings, problems


def config_from_form(values: list[Any]) -> tuple[TrainConfig | None, list[Problem]]:
    """The validated config, or None and every problem, each naming its setting."""
    settings, problems = settings_from_form(values)
    if problems:
        return None, problems
    try:
        return from_dict(settings, where="form"), []
    except ConfigError as error:
        return None, error.problems
