"""Weights & Biases logging (saving.wandb), the thumbnail in each saved adapter (saving.thumbnail), and sampling
with the moving average (sampling.use_ema) in a run."""

from __future__ import annotations

import base64
import io
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import settings, small_dataset, train  # noqa: F401 (small_dataset is a fixture)

from trainer.adapters.weights import AdapterWeights
from trainer.errors import MissingPackageError, TrainingError
from trainer.kohya.adapter_file import load_adapter, save_adapter
from trainer.kohya.inspect import format_summary, summarize
from trainer.kohya.metadata import THUMBNAIL_KEY, thumbnail_data_uri
from trainer.runs.run_directory import RunDirectory
from trainer.training.progress import RunReporter, StepClock


def test_wandb_offline_logs_into_the_run_folder_without_an_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb); saving.wandb is tested where it is")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = RunDirectory(tmp_path / "run")
    run.create()
    report = RunReporter(run, main_process=True, show_progress=False)
    report.open_wandb("offline", "dora-studio-test", {"network": {"rank": 4}})
    report.start_steps(total_steps=1, steps_done=0, epochs=1)
    report.validation_done(0, 0.3)
    report.step_done(1, 1, 0.25, {"unet": 1e-4}, StepClock())
    report.close()
    (offline_run,) = run.wandb_dir.glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))  # the history `wandb sync` uploads


def test_tensorboard_gets_the_loss_the_learning_rates_and_the_validation_loss(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = RunDirectory(tmp_path / "run")
    run.create()
    report = RunReporter(run, main_process=True, show_progress=False)
    report.open_tensorboard()
    report.start_steps(total_steps=2, steps_done=0, epochs=1)
    report.validation_done(0, 0.3)
    report.step_done(1, 1, 0.25, {"unet": 1e-4, "unet/up": 1.6e-3}, StepClock())
    report.step_done(2, 1, 0.2, {"unet": 1e-4, "unet/up": 1.6e-3}, StepClock())
    report.close()
    events = event_accumulator.EventAccumulator(str(run.tensorboard_dir))
    events.Reload()
    scalars = {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {
        "loss": [(1, 0.25), (2, 0.2)],
        "lr/unet": [(1, 1e-4), (2, 1e-4)],
        "lr/unet/up": [(1, 1.6e-3), (2, 1.6e-3)],
        "loss/validation": [(0, 0.3)],
    }


def test_a_wandb_that_will_not_start_names_the_setting_and_the_ways_out(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")

    def refuse(**_):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)  # online without a login, hermetically
    report = RunReporter(RunDirectory(tmp_path), main_process=True, show_progress=False)
    with pytest.raises(TrainingError, match="saving.wandb") as info:
        report.open_wandb("online", "dora-studio", {})
    assert "No API key" in str(info.value) and "wandb login" in str(info.value) and '"offline"' in str(info.value)


def test_choosing_wandb_without_the_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail, installed or not
    report = RunReporter(RunDirectory(tmp_path), main_process=True, show_progress=False)
    with pytest.raises(MissingPackageError, match="saving.wandb needs the 'wandb' package") as info:
        report.open_wandb("offline", "dora-studio", {})
    assert "pip install wandb" in str(info.value)


def test_a_thumbnail_is_a_small_jpeg_data_uri_that_inspect_describes(tmp_path):
    sample = tmp_path / "00.png"
    Image.effect_noise((768, 512), 60).convert("RGB").save(sample)  # noise: the worst case for JPEG's size
    uri = thumbnail_data_uri(sample)
    assert uri.startswith("data:image/jpeg;base64,")  # what SwarmUI requires
    raw = base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))
    assert Image.open(io.BytesIO(raw)).size == (256, 171) and len(raw) < 40_000

    path = tmp_path / "adapter.safetensors"
    weights = {"lora_unet_a": AdapterWeights(down=torch.randn(2, 4), up=torch.zeros(3, 2), alpha=2.0)}
    save_adapter(path, weights, {"ss_network_dim": "2", THUMBNAIL_KEY: uri})
    summary = summarize(load_adapter(path))
    assert summary["thumbnail"] == f"JPEG 256x171, {len(raw) / 1024:.1f} KB"
    text = format_summary(summary)
    assert f"thumbnail: {summary['thumbnail']}" in text and "base64" not in text


def test_the_newest_sample_of_a_prompt_is_the_thumbnail_never_the_base_models(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.newest_sample(0) is None  # no samples yet: no thumbnail, and no error
    for age, folder in enumerate([run.epoch_samples_dir(1), run.step_samples_dir(6), run.epoch_samples_dir(0)]):
        folder.mkdir(parents=True)
        for name in ("00.png", "01.png"):
            (folder / name).write_bytes(b"")
            os.utime(folder / name, (age, age))
    assert run.newest_sample(1) == run.step_samples_dir(6) / "01.png"
    assert run.newest_sample(2) is None


def test_sampling_with_the_average_leaves_training_bit_identical_and_each_file_gets_its_thumbnail(
    tiny_dir,
    small_dataset,  # noqa: F811
    tmp_path,
):
    def data(**sampling_and_saving) -> dict:
        return settings(
            tiny_dir,
            small_dataset,
            tmp_path / "cache",
            training={"epochs": 1, "ema_decay": 0.9},
            **sampling_and_saving,
        )

    sampled = train(
        data(sampling={"use_ema": True, "every_n_steps": 2}, saving={"thumbnail": True, "every_n_steps": 2}),
        tmp_path / "sampled",
    )
    plain = train(data(sampling={"prompts": []}, saving={"every_n_steps": 2}), tmp_path / "plain")

    # swapping the average in for the samples (at step 2, mid-run) gave the trained weights back bit for bit
    for ours, theirs in [(sampled, plain), (RunDirectory.ema_twin(sampled), RunDirectory.ema_twin(plain))]:
        ours, theirs = load_file(ours), load_file(theirs)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)

    run = RunDirectory(tmp_path / "sampled")
    step_2 = run.adapter_path("test", "step", step=2)
    for path, image in [(step_2, run.step_samples_dir(2) / "00.png"), (sampled, run.newest_sample(0))]:
        for file in (path, RunDirectory.ema_twin(path)):  # the average's file shows the same sample
            assert load_adapter(file).metadata[THUMBNAIL_KEY] == thumbnail_data_uri(image)
    assert THUMBNAIL_KEY not in load_adapter(plain).metadata
