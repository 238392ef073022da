"""Nothing is lost: a full disk, a NaN, a SIGKILL anywhere; the run fails clearly or resumes bit-identically."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file
from test_training import metrics, settings, small_dataset, train  # noqa: F401  (small_dataset is a fixture)

import trainer.kohya.adapter_file as adapter_file
import trainer.training.loop as training
from trainer.errors import TrainingError
from trainer.kohya.adapter_file import load_adapter
from trainer.runs.train_state import list_states

REPO = Path(__file__).resolve().parents[1]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_full_disk_fails_the_run_and_keeps_the_last_good_adapter_and_state(
    tiny_dir,
    small_dataset,  # noqa: F811 (the fixture imported above)
    tmp_path,
    monkeypatch,
):
    real_write = adapter_file.write_bytes_atomically
    calls = {"n": 0}

    def fill_the_disk(path, chunks):
        calls["n"] += 1
        if calls["n"] < 3:
            return real_write(path, chunks)

        def half_then_full():
            yield next(iter(chunks))
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_write(path, half_then_full())

    monkeypatch.setattr(adapter_file, "write_bytes_atomically", fill_the_disk)
    run_dir = tmp_path / "run"
    data = settings(tiny_dir, small_dataset, tmp_path / "cache", saving={"every_n_steps": 2}, sampling={"prompts": []})
    with pytest.raises(TrainingError, match="No space left on device.*free disk space") as failure:
        train(data, run_dir)
    assert "test-step000004.safetensors" in str(failure.value)  # the last good adapter, named

    adapters = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert adapters == ["test-step000002.safetensors", "test-step000004.safetensors"]  # no half-written file
    assert len(load_adapter(run_dir / "adapters/test-step000004.safetensors").adapters) == 722
    assert [p.name for p in list_states(run_dir / "state")] == ["step-00000002", "step-00000004"]
    assert status(run_dir)["state"] == "failed" and "No space left" in status(run_dir)["message"]


def _nan_at_call(monkeypatch, bad_call: int) -> None:
    real_loss, calls = training.training_loss, {"n": 0}

    def loss_with_a_nan(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * math.nan if calls["n"] == bad_call else loss

    monkeypatch.setattr(training, "training_loss", loss_with_a_nan)


def test_nan_loss_fails_with_the_usual_fixes_and_keeps_the_last_save(
    tiny_dir,
    small_dataset,  # noqa: F811 (the fixture imported above)
    tmp_path,
    monkeypatch,
):
    _nan_at_call(monkeypatch, bad_call=3)
    run_dir = tmp_path / "run"
    data = settings(tiny_dir, small_dataset, tmp_path / "cache", saving={"every_n_steps": 1}, sampling={"prompts": []})
    with pytest.raises(TrainingError, match="loss became nan at step 3.*lower the learning rate"):
        train(data, run_dir)
    assert status(run_dir)["state"] == "failed"
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]
    assert [p.name for p in list_states(run_dir / "state")] == ["step-00000001", "step-00000002"]
    saved = load_file(run_dir / "adapters/test-step000002.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_nan_gradient_is_caught_too(tiny_dir, small_dataset, tmp_path, monkeypatch):  # noqa: F811
    real_prepare, state = training.prepare_session, {"steps": 0}

    def prepare_with_a_poisoned_gradient(*args, **kwargs):
        session = real_prepare(*args, **kwargs)
        first = next(iter(session.trainable.values()))

        def poison(grad):
            state["steps"] += 1
            return grad * math.inf if state["steps"] == 2 else grad  # finite loss, infinite gradient

        first.register_hook(poison)
        return session

    monkeypatch.setattr(training, "prepare_session", prepare_with_a_poisoned_gradient)
    data = settings(tiny_dir, small_dataset, tmp_path / "cache", sampling={"prompts": []})
    with pytest.raises(TrainingError, match="gradient norm became (inf|nan) at step 2"):
        train(data, tmp_path / "run")


def test_bad_batches_can_be_skipped_up_to_a_limit(tiny_dir, small_dataset, tmp_path, monkeypatch, caplog):  # noqa: F811
    _nan_at_call(monkeypatch, bad_call=3)
    data = settings(
        tiny_dir, small_dataset, tmp_path / "cache", training={"max_skipped_batches": 1}, sampling={"prompts": []}
    )
    with caplog.at_level(logging.WARNING, logger="dora_studio"):
        adapter = train(data, tmp_path / "run")
    assert "batch skipped (1 of 1 allowed)" in caplog.text
    assert [row["step"] for row in metrics(tmp_path / "run")] == list(range(1, 8))  # 8 batches, one dropped
    assert all(torch.isfinite(t).all() for t in load_file(adapter).values())


# -- SIGKILL at random points, then --resume auto ----------------------------------------------------------


def _launch(preset: Path, run_dir: Path, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainer.cli", "train", str(preset), "--run-dir", str(run_dir), "--no-progress"]
    command += ["--resume", "auto"] if resume else []
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _kill_when(process: subprocess.Popen, run_dir: Path, condition, what: str) -> str:
    """SIGKILL the trainer as soon as ``condition(status, metric_lines)`` holds; returns what was seen."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the trainer ended before {what}: {process.stderr.read().decode()[-2000:]}")
        try:
            state = json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            state = {}
        lines = len((run_dir / "metrics.jsonl").read_text().splitlines()) if (run_dir / "metrics.jsonl").exists() else 0
        if condition(state, lines):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"{what}: state {state.get('state')}, step {state.get('step')}, {lines} metric lines"
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_anywhere_then_resume_auto_is_bit_identical(tiny_dir, small_dataset, tmp_path):  # noqa: F811
    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        dataset={"flip": True},
        network={"rank_dropout": 0.1},
        training={"epochs": 3},
        saving={"every_n_steps": 3, "every_n_epochs": 0},
        sampling={"prompts": []},
    )
    preset = tmp_path / "preset.toml"
    preset.write_text(tomli_w.dumps(data))
    reference = train(data, tmp_path / "reference")

    run_dir = tmp_path / "crashed"
    crash_points = [
        ("during caching", lambda state, lines: state.get("state") == "caching"),
        ("mid-epoch, between saves", lambda state, lines: lines >= 5),
        ("while saving", lambda state, lines: state.get("state") == "saving" and lines >= 8),
        ("right after a save, mid-epoch 3", lambda state, lines: lines >= 10),
    ]
    seen = []
    for index, (what, condition) in enumerate(crash_points):
        seen.append(_kill_when(_launch(preset, run_dir, resume=index > 0), run_dir, condition, what))
    finisher = _launch(preset, run_dir, resume=True)
    _, stderr = finisher.communicate(timeout=300)
    assert finisher.returncode == 0, stderr.decode()[-3000:]

    assert status(run_dir)["state"] == "done", seen
    steps = [row["step"] for row in metrics(run_dir)]
    assert steps == list(range(1, 13)), (steps, seen)  # 3 epochs x 4 steps: none missing, none twice
    ours, theirs = load_file(run_dir / "adapters/test.safetensors"), load_file(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours), seen
    assert not list((run_dir / "adapters").glob(".*")) and not list((run_dir / "state").glob(".tmp-*"))
