"""The Configure form is the settings schema: every key has a field, values round-trip, problems are named."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.form import FORM_KEYS, build_form, config_from_form, form_values
from trainer.config.presets import load_config
from trainer.config.schema import all_keys

QUICKSTART = Path(__file__).resolve().parents[1] / "presets" / "quickstart.toml"


def test_every_setting_has_exactly_one_field_labelled_with_its_name():
    assert FORM_KEYS == all_keys()
    with gr.Blocks():
        form = build_form(load_config(QUICKSTART))
    assert list(form) == FORM_KEYS
    assert all(component.label == key.partition(".")[2] for key, component in form.items())
    assert isinstance(form["network.kind"], gr.Dropdown) and isinstance(form["dataset.flip"], gr.Checkbox)
    assert isinstance(form["network.rank"], gr.Number) and form["network.rank"].precision == 0


def test_form_values_round_trip_to_the_same_config():
    for preset in sorted(QUICKSTART.parent.glob("*.toml")):
        config = load_config(preset)
        again, problems = config_from_form(form_values(config))
        assert problems == [] and again == config, preset.name


def test_the_built_form_holds_each_preset_unchanged():
    """What the page shows (the components' own values) converts back to the preset's config."""
    for preset in sorted(QUICKSTART.parent.glob("*.toml")):
        config = load_config(preset)
        with gr.Blocks():
            form = build_form(config)
        assert config_from_form([component.value for component in form.values()]) == (config, []), preset.name


def test_problems_name_the_field():
    values = form_values(load_config(QUICKSTART))
    values[FORM_KEYS.index("network.rank")] = 4.5
    values[FORM_KEYS.index("optimizer.betas")] = "0.9, x"
    _, problems = config_from_form(values)
    assert any(p.where == "network.rank" and p.message.startswith("expected a whole number") for p in problems)
    assert any(p.where == "optimizer.betas" for p in problems)

    values = form_values(load_config(QUICKSTART))
    values[FORM_KEYS.index("dataset.caption_dropout")] = 1.5
    values[FORM_KEYS.index("network.kind")] = "loha"
    config, problems = config_from_form(values)
    assert config is None
    assert any(p.where == "dataset.caption_dropout" and "maximum" in p.message for p in problems)
    assert any(p.where == "network.kind" for p in problems)


def test_blank_optional_learning_rates_stay_unset_and_lists_split_per_line():
    values = form_values(load_config(QUICKSTART))
    assert values[FORM_KEYS.index("optimizer.unet_lr")] is None
    values[FORM_KEYS.index("optimizer.unet_lr")] = 2e-4
    values[FORM_KEYS.index("sampling.prompts")] = "a cat --d 1\n\n  a dog  \n"
    config, problems = config_from_form(values)
    assert problems == []
    assert config.optimizer.unet_lr == 2e-4 and config.optimizer.text_encoder_1_lr is None
    assert config.sampling.prompts == ["a cat --d 1", "a dog"]
