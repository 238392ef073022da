"""Comparing runs: the settings that differ, the loss curves on one chart, the same prompt side by side.
Run folders are made by hand here, as a finished run leaves them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_app_runs import make_run, write_samples

from app.compare import loss_curves_of, sampling_labels, settings_difference, side_by_side
from app.compare_tab import compare_runs, compare_samples
from app.plots import loss_frame


def _run(runs_dir: Path, name: str, config: str, losses: list[float], samplings: list[str]) -> Path:
    root = make_run(runs_dir, name, state="done")
    (root / "config.toml").write_text(config)
    lines = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)] + [{"step": 2, "validation_loss": 0.5}]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    for age, folder in enumerate(reversed(samplings)):
        write_samples(root, folder, ["a cat", "a dog"], time.time() - 10 * age)
    return root


def test_two_runs_side_by_side(tmp_path):
    lora = _run(
        tmp_path,
        "lora-r8",
        '[network]\nkind = "lora"\nrank = 8\n[training]\nseed = 1\n[[dataset.subsets]]\npath = "a"\n',
        [1.0, 0.5],
        ["epoch_000", "epoch_001", "epoch_002"],
    )
    dora = _run(
        tmp_path,
        "dora-r8",
        '[network]\nkind = "dora"\nrank = 8\n[training]\nseed = 1\n[[dataset.subsets]]\npath = "b"\n',
        [0.9],
        ["epoch_000", "epoch_001"],
    )
    broken = make_run(tmp_path, "broken", state="failed")
    (broken / "config.toml").write_text("not [toml")

    header, rows = settings_difference([lora, dora])
    assert header == ["setting", "lora-r8", "dora-r8"]
    assert rows == [["dataset.subsets[0].path", "a", "b"], ["network.kind", "lora", "dora"]]  # rank, seed equal
    _, rows = settings_difference([lora, broken])
    assert any(row[0] == "config.toml" and row[2].startswith("(unreadable)") for row in rows)

    curves = loss_curves_of([lora, dora])
    assert curves["series"] == ["lora-r8", "lora-r8", "lora-r8, validation", "dora-r8", "dora-r8, validation"]
    assert curves["loss"][:2] == [1.0, pytest.approx((0.9 * 1.0 + 0.5) / 1.9)]  # the smoothed line (debiased)

    assert sampling_labels([lora, dora]) == ["base model", "epoch 1"]  # epoch 2: only the first run has it
    pair = side_by_side([lora, dora], prompt_index=1, sampling="epoch 1")
    assert [(sample.path.parent.parent.parent.name, sample.path.name, run) for sample, run in pair] == [
        ("lora-r8", "01.png", "lora-r8"),
        ("dora-r8", "01.png", "dora-r8"),
    ]


def test_the_tab_needs_two_runs_and_refuses_names_outside_the_runs_folder(tmp_path):
    _run(tmp_path, "one", "[network]\nrank = 4\n", [1.0], ["epoch_001"])
    _run(tmp_path, "two", "[network]\nrank = 8\n", [1.0], ["epoch_001"])
    note, table, *_ = compare_runs(tmp_path, ["one", "../one"])  # a path from the browser is not a run name
    assert note == "Choose two or more runs." and table is None
    note, table, curves, prompt, sampling = compare_runs(tmp_path, ["one", "two"])
    assert note == "1 setting differs." and table.values.tolist() == [["network.rank", "4", "8"]]
    assert set(curves["series"]) == {"one", "two", "one, validation", "two, validation"}
    images = compare_samples(tmp_path, ["one", "two"], "0", "epoch 1")
    assert [label for _, label in images] == ["one · epoch 1", "two · epoch 1"]


def test_a_loss_chart_gets_nothing_rather_than_an_empty_frame():
    assert loss_frame({}) is None and loss_frame({"step": [], "loss": [], "series": []}) is None
    frame = loss_frame({"step": [1], "loss": [0.5], "series": ["training"]})
    assert dict(frame.dtypes.astype(str)) == {"step": "int64", "loss": "float64", "series": "string"}
