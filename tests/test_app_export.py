"""The Export tab's analysis: ``dora-studio analyze --run`` in its own process, its plot and text shown, and
shown again from the run folder when the tab opens later."""

from __future__ import annotations

from pathlib import Path

import torch

from app.form import config_from_form
from app.ui import Studio
from trainer.adapters.weights import AdapterWeights
from trainer.kohya.adapter_file import save_adapter

STEM = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 32 x 32 in the tiny model


def _run(runs_dir: Path, name: str, tiny_dir: Path, checkpoints: int) -> None:
    run = runs_dir / name
    (run / "adapters").mkdir(parents=True)
    (run / "config.toml").write_text(
        f'[model]\npath = "{tiny_dir}"\n\n[dataset]\npath = "data"\n\n[saving]\noutput_name = "tiny"\n'
    )
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    for index in range(checkpoints):
        name = "tiny" if index == checkpoints - 1 else f"tiny-epoch{index + 1:03d}"
        save_adapter(run / "adapters" / f"{name}.safetensors", {STEM: AdapterWeights(down, up * (index + 1), 2.0)}, {})


def test_analyze_button_shows_the_plot_and_the_blocks_and_keeps_them(tmp_path, tiny_dir):
    _run(tmp_path, "trained", tiny_dir, checkpoints=2)
    studio = Studio(tmp_path)
    assert studio.analysis("trained", now=False) == (None, "Not analyzed yet.")
    plot, text = studio.analysis("trained", now=True)
    assert plot == str(tmp_path / "trained" / "analysis" / "decomposition.png") and Path(plot).is_file()
    assert "2 checkpoints, LoRA (input axis)" in text
    assert "q     " in text and "tiny.safetensors, most turned blocks:\n  unet down_blocks.1" in text
    assert studio.analysis("trained", now=False) == (plot, text)  # the tab reopened: the stored result


def test_a_run_with_nothing_saved_says_so(tmp_path, tiny_dir):
    _run(tmp_path, "fresh", tiny_dir, checkpoints=0)
    plot, text = Studio(tmp_path).analysis("fresh", now=True)
    assert plot is None and text.startswith("error: ") and "holds no adapter yet" in text
    assert Studio(tmp_path).analysis(None, now=True) == (None, "Choose a run first.")


def test_resize_and_convert_buttons_make_files_apart_from_the_checkpoints(tmp_path, tiny_dir):
    _run(tmp_path, "trained", tiny_dir, checkpoints=1)
    studio = Studio(tmp_path)
    text, button = studio.make_file("trained", "tiny.safetensors", "resize", 1)
    made = tmp_path / "trained" / "exports" / "tiny-r1.safetensors"
    assert button.visible and button.value["orig_name"] == made.name and made.is_file()
    assert "1 of 1 layers cut" in text and "merged-weight error against the original file" in text
    text, button = studio.make_file("trained", "tiny.safetensors", "resize", 1)  # again: a new name, nothing lost
    assert button.value["orig_name"] == "tiny-r1-2.safetensors" and made.with_name(button.value["orig_name"]).is_file()
    text, button = studio.make_file("trained", "tiny.safetensors", "convert to DoRA", None)
    assert "layers as DORA (input axis)" in text and button.value["orig_name"] == "tiny-dora.safetensors"
    assert [p.name for p in (tmp_path / "trained" / "adapters").glob("*.safetensors")] == ["tiny.safetensors"]
    text, button = studio.make_file("trained", "tiny.safetensors", "resize", None)
    assert text.startswith("Give a rank") and not button.visible
    text, button = studio.make_file("trained", "tiny.safetensors", "resize", 2)  # rank 2: nothing to cut
    assert text.startswith("error: ") and "nothing was written" in text and not button.visible


def test_train_again_fills_the_form_with_the_runs_own_settings(tmp_path, tiny_dir):
    _run(tmp_path, "trained", tiny_dir, checkpoints=1)
    studio = Studio(tmp_path)
    *values, message, tabs = studio.settings_of_run("trained")
    config, problems = config_from_form(values)
    assert problems == [] and config.model.path == str(tiny_dir) and config.saving.output_name == "tiny"
    assert "trained" in message and tabs.selected == "configure"
    *_, message, _ = studio.settings_of_run("missing")
    assert "missing" in message
