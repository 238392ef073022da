"""End to end on the tiny SDXL-structured model: train, sample, save, verify, load in diffusers, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.config.parsing import from_dict
from trainer.errors import TrainStateError
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.merge import canonical_stems, match_stems, model_stem_targets, pipeline_parts
from trainer.kohya.verify import verify_match
from trainer.runs.run_directory import RunDirectory
from trainer.sdxl.model_files import load_sdxl_pipeline
from trainer.training.loop import Trainer
from trainer.training.signals import StopRequested

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Four images in two buckets (square and landscape) with captions, one folder with 2 repeats."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "2_thing"
    folder.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for index, colour in enumerate(colours):
        size = (64, 64) if index < 2 else (128, 64)
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 255), (8 * index, 8, 8 * index + 16, 24))
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a square, colour {index}, plain background")
    return root


def settings(tiny_dir: Path, data_root: Path, cache: Path, **sections) -> dict:
    base = {
        "model": {"path": str(tiny_dir)},
        "dataset": {
            "path": str(data_root),
            "resolution": 64,
            "min_bucket_side": 64,
            "max_bucket_side": 128,
            "latent_cache_dir": str(cache),
            "loader_workers": 0,
            "trigger_word": "zqx",
        },
        "network": {"kind": "dora", "rank": 4, "alpha": 4.0},
        "optimizer": {"learning_rate": 1e-3, "scheduler": "cosine", "warmup_steps": 2},
        "training": {"epochs": 2, "batch_size": 2, "mixed_precision": "no", "seed": 7},
        "sampling": {"prompts": ["zqx, a square --d 3"], "steps": 2},
        "saving": {"output_name": "test"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def train(data: dict, run_dir: Path, resume: str | None = None) -> Path:
    return Trainer(from_dict(data), RunDirectory(run_dir), show_progress=False).run_training(resume)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dora_run_end_to_end(tiny_dir, small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    adapter = train(settings(tiny_dir, small_dataset, tmp_path / "cache"), run_dir)

    # 4 images x 2 repeats = 8 per epoch; batches of 2 never mix the two buckets -> 4 steps per epoch
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert rows[0]["lr"]["unet"] == pytest.approx(5e-4)  # warmup: step 1 of 2
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 8 and status["last_adapter"] == str(adapter)

    for epoch in (1, 2):
        prompts = json.loads((run_dir / f"samples/epoch_{epoch:03d}/prompts.json").read_text())
        assert prompts[0]["prompt"] == "zqx, a square" and prompts[0]["seed"] == 3
        assert Image.open(run_dir / f"samples/epoch_{epoch:03d}/00.png").size == (64, 64)
    # no moving average (training.ema_decay) and no thumbnail (saving.thumbnail) unless asked for
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["test-epoch001.safetensors", "test.safetensors"]
    config_toml = (run_dir / "config.toml").read_text()
    assert 'kind = "dora"' in config_toml and str(small_dataset) in config_toml

    loaded = load_adapter(adapter)
    meta = loaded.metadata
    assert meta["ss_steps"] == "8" and meta["ss_network_dim"] == "4" and meta["dora_studio.dora_axis"] == "input"
    assert "modelspec.thumbnail" not in meta and "dora_studio.ema" not in meta
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_thing": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["2_thing"]["a square"] == 4
    assert len(loaded.adapters) == 722 and all(w.is_dora for w in loaded.adapters.values())
    assert any(w.up.abs().max() > 0 for w in loaded.adapters.values())  # it learned something

    parts = pipeline_parts(load_sdxl_pipeline(tiny_dir))
    report = verify_match(
        match_stems(canonical_stems(loaded, parts).adapters, model_stem_targets(parts)), tolerance=1e-5
    )
    assert report.ok


def test_lora_with_text_encoders_conv_checkpointing_and_accumulation(tiny_dir, small_dataset, tmp_path):
    """Many paths at once: LoRA, attn+conv, both text encoders, gradient checkpointing, accumulation."""
    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        network={
            "kind": "lora",
            "unet_targets": "attn+conv",
            "train_text_encoders": True,
            "conv_rank": 2,
            "conv_alpha": 1.0,
        },
        optimizer={"text_encoder_1_lr": 5e-4, "text_encoder_2_lr": 2e-4},
        training={"epochs": 1, "gradient_accumulation": 3, "gradient_checkpointing": True},
        sampling={"prompts": []},
    )
    adapter = train(data, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]  # 4 batches in groups of 3: one full, one short
    assert set(rows[0]["lr"]) == {"unet", "text_encoder_1", "text_encoder_2"}

    loaded = load_adapter(adapter)
    stems = set(loaded.adapters)
    assert len(stems) == 722 + 66 + 72 + 192
    trained = {
        part: max(w.up.abs().max().item() for s, w in loaded.adapters.items() if s.startswith(prefix))
        for part, prefix in (("unet", "lora_unet"), ("te1", "lora_te1"), ("te2", "lora_te2"))
    }
    assert all(value > 0 for value in trained.values()), trained

    # diffusers' own loader takes every key (nothing reported unknown, every layer becomes a LoRA layer)
    pipe = load_sdxl_pipeline(tiny_dir)
    pipe.load_lora_weights(str(adapter))
    counts = {
        name: sum(hasattr(m, "lora_A") for m in model.modules())
        for name, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2))
    }
    assert counts == {"unet": 722 + 66, "te1": 72, "te2": 192}


def _stop_when(run_dir: Path, step: int) -> threading.Thread:
    """Drop a ``stop`` command once ``step`` appears in metrics.jsonl, as the UI would."""

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= step:
                RunDirectory(run_dir).send_command("stop")
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _straight_and_resumed(data: dict, root: Path) -> tuple[Path, Path, Path]:
    """The run trained straight through, and again stopped after step 3 (as the UI's Stop does) and resumed:
    both final adapters, and the stopped-and-resumed run's folder."""
    straight = train(data, root / "straight")
    interrupted = root / "interrupted"
    _stop_when(interrupted, 3)
    with pytest.raises(StopRequested):
        train(data, interrupted)
    stopped_at = json.loads((interrupted / "status.json").read_text())
    assert stopped_at["state"] == "stopped"
    assert 3 <= stopped_at["step"] < 8
    return straight, train(data, interrupted, resume="auto"), interrupted


def test_stop_then_resume_is_bit_identical_to_an_uninterrupted_run(tiny_dir, small_dataset, tmp_path):
    held_out = tmp_path / "validation"
    held_out.mkdir()
    for image in sorted(small_dataset.rglob("*.png"))[:1]:
        shutil.copy(image, held_out)
        shutil.copy(image.with_suffix(".txt"), held_out)
    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        dataset={"flip": True},
        network={"rank_dropout": 0.2},
        sampling={"prompts": []},
        validation={"path": str(held_out), "every_n_steps": 3},
        training={"ema_decay": 0.9, "ema_every_n_steps": 2},  # the stop (step 3) falls between two updates
    )
    straight, resumed, interrupted = _straight_and_resumed(data, tmp_path)

    steps = [row["step"] for row in metrics(interrupted) if "loss" in row]
    assert steps == list(range(1, 9))  # nothing repeated or missing
    ours, theirs = load_file(resumed), load_file(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    # the moving average too: the resume state carries it
    ours_ema, theirs_ema = load_file(RunDirectory.ema_twin(resumed)), load_file(RunDirectory.ema_twin(straight))
    assert ours_ema.keys() == ours.keys() and all(torch.equal(ours_ema[key], theirs_ema[key]) for key in ours)
    assert not all(torch.equal(ours_ema[key], ours[key]) for key in ours)  # an average, not the last weights
    losses = [row["loss"] for row in metrics(interrupted) if "loss" in row]
    assert losses == [row["loss"] for row in metrics(tmp_path / "straight") if "loss" in row]
    # the validation loss: at fixed noise, the same numbers whether the run was stopped and resumed or not
    validation = [(row["step"], row["validation_loss"]) for row in metrics(interrupted) if "validation_loss" in row]
    assert [step for step, _ in validation] == [0, 3, 6]
    assert validation == [
        (r["step"], r["validation_loss"])
        for r in metrics(tmp_path / "straight")
        if "step" in r and "validation_loss" in r
    ]
    assert validation[0][1] != validation[-1][1]  # it measures the adapter, which trained


def test_resume_refuses_changed_training_settings(tiny_dir, small_dataset, tmp_path):

    data = settings(tiny_dir, small_dataset, tmp_path / "cache", training={"epochs": 1}, sampling={"prompts": []})
    train(data, tmp_path / "run")
    changed = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        training={"epochs": 2},
        sampling={"prompts": []},
        network={"rank": 8},
    )
    with pytest.raises(TrainStateError, match="network.rank"):
        train(changed, tmp_path / "run", resume="auto")


def test_latent_and_text_caches_do_not_change_the_loss(tiny_dir, small_dataset, tmp_path):
    """Caching stores the posterior moments and the exact conditioning, so the steps are the same."""
    common = dict(training={"epochs": 1}, sampling={"prompts": []})
    train(settings(tiny_dir, small_dataset, tmp_path / "cache", **common), tmp_path / "cached")
    uncached = settings(tiny_dir, small_dataset, tmp_path / "cache2", **common)
    uncached["dataset"] |= {"cache_latents": False, "cache_text_encoder_outputs": False}
    train(uncached, tmp_path / "uncached")
    assert not (tmp_path / "cache2").exists()
    cached_losses = [row["loss"] for row in metrics(tmp_path / "cached")]
    uncached_losses = [row["loss"] for row in metrics(tmp_path / "uncached")]
    assert cached_losses == pytest.approx(uncached_losses, rel=1e-4)


def test_sigterm_saves_and_stops_cleanly(tiny_dir, small_dataset, tmp_path):
    """The CLI in its own process: SIGTERM mid-run saves adapter and state, exits 0, and can resume."""
    data = settings(tiny_dir, small_dataset, tmp_path / "cache", training={"epochs": 50}, sampling={"prompts": []})
    preset = tmp_path / "preset.toml"
    import tomli_w

    preset.write_text(tomli_w.dumps(data))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "trainer.cli", "train", str(preset), "--run-dir", str(run_dir), "--no-progress"]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "--resume auto" in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped"
    step = status["step"]
    assert (run_dir / f"adapters/test-step{step:06d}.safetensors").is_file()
    assert (run_dir / f"state/step-{step:08d}/state.json").is_file()


def test_quickstart_preset_runs_from_the_cli(tmp_path, monkeypatch, capsys):
    """The README's quick start, shortened: builtin:toy-sdxl is written to the cache, datasets_example trains."""
    from trainer.cli import main

    monkeypatch.setenv("DORA_STUDIO_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            str(REPO / "presets/quickstart.toml"),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--set",
            "training.max_steps=2",
            "--set",
            "sampling.at_start=false",
            "--set",
            "sampling.steps=2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"adapter: {run_dir / 'adapters/quickstart-dora.safetensors'}" in out
    assert len(list((tmp_path / "cache/models").glob("toy-sdxl-sha*/model_index.json"))) == 1
    samples = sorted(p.name for p in (run_dir / "samples/step_000002").iterdir())
    assert samples == ["00.png", "01.png", "02.png", "03.png", "prompts.json"]
    assert load_adapter(run_dir / "adapters/quickstart-dora.safetensors").metadata["ss_steps"] == "2"


def test_dora_magnitudes_are_never_weight_decayed(tiny_dir, small_dataset, tmp_path):
    from trainer.training.network import inject_network
    from trainer.training.optimizers import run_optimizer

    config = from_dict(settings(tiny_dir, small_dataset, tmp_path / "cache", optimizer={"weight_decay": 0.1}))
    adapters = inject_network(load_sdxl_pipeline(tiny_dir), config)
    optimizer, _ = run_optimizer(config.optimizer, adapters, total_steps=10)
    groups = {group["name"]: group for group in optimizer.param_groups}
    magnitudes = {id(layer.dora_scale) for layer in adapters["unet"].values()}
    assert {id(p) for p in groups["unet/no_decay"]["params"]} == magnitudes
    assert groups["unet/no_decay"]["weight_decay"] == 0 and groups["unet"]["weight_decay"] == 0.1
    assert not magnitudes & {id(p) for p in groups["unet"]["params"]}


def test_dvora_run_resumes_bit_identically_and_its_file_loads_as_dora_and_as_dvora(
    tiny_dir, small_dataset, tmp_path, capsys
):
    """DVoRA end to end: trains only d, b and the magnitude; resumes bit for bit; the file is a DoRA file every
    front end merges to our weights, and ``inspect`` rebuilds its projections (and refuses an edited record)."""
    from safetensors import safe_open

    from trainer.cli import main
    from trainer.kohya.adapter_file import save_adapter
    from trainer.kohya.metadata import VERA_KEY

    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        network={"kind": "dvora", "rank": 8, "alpha": 8.0},
        sampling={"prompts": []},
    )
    straight, resumed, interrupted = _straight_and_resumed(data, tmp_path)
    ours, theirs = load_file(resumed), load_file(straight)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)

    state = next((interrupted / "state").iterdir()) / "tensors.safetensors"
    with safe_open(state, "pt") as tensors:
        names = {key.rsplit("/", 1)[-1] for key in tensors.keys() if key.startswith("param/") or "/lora_unet_" in key}
    assert {"vera_d", "vera_b", "dora_scale"} <= names and not names & {"lora_down", "lora_up"}

    loaded = load_adapter(straight)
    assert len(loaded.adapters) == 722 and all(w.is_dora and w.rank == 8 for w in loaded.adapters.values())
    assert any(w.up.abs().max() > 0 for w in loaded.adapters.values())
    parts = pipeline_parts(load_sdxl_pipeline(tiny_dir))
    report = verify_match(
        match_stems(canonical_stems(loaded, parts).adapters, model_stem_targets(parts)), tolerance=1e-5
    )
    assert report.ok

    assert main(["inspect", str(straight)]) == 0
    assert "dvora projections (unet seed 0, rank 8" in capsys.readouterr().out
    record = json.loads(loaded.metadata[VERA_KEY])
    record["projections"]["unet"]["seed"] = 1
    edited = tmp_path / "edited.safetensors"
    save_adapter(edited, loaded.adapters, loaded.metadata | {VERA_KEY: json.dumps(record)})
    assert main(["inspect", str(edited)]) == 2
    assert "seed 1 no longer gives the matrices the file was trained with" in capsys.readouterr().err


def test_vera_run_saved_at_a_lower_rank_records_what_the_cut_cost(tiny_dir, small_dataset, tmp_path, capsys):
    """saving.export_rank: a rank-8 VeRA run saved at rank 4 by SVD; the file says so and still verifies."""
    from trainer.cli import main
    from trainer.kohya.metadata import EXPORT_RANK_KEY, VERA_KEY

    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        network={"kind": "vera", "rank": 8, "alpha": 8.0},
        optimizer={"learning_rate": 1e-2},
        training={"epochs": 1},
        sampling={"prompts": []},
        saving={"export_rank": 4},
    )
    loaded = load_adapter(train(data, tmp_path / "run"))
    assert all(w.rank == 4 and not w.is_dora and w.gamma == 1.0 for w in loaded.adapters.values())
    meta = loaded.metadata
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0 and VERA_KEY not in meta
    record = json.loads(meta[EXPORT_RANK_KEY])
    assert record["rank"] == 4 and record["trained_rank"] == 8 and record["kind"] == "vera"
    assert record["layers_cut"] == 722 and 0 < record["update_error_mean"] <= record["update_error_max"] < 1
    assert set(record) == {"rank", "trained_rank", "kind", "layers_cut", "update_error_max", "update_error_mean"}
    assert main(["verify", str(tmp_path / "run/adapters/test.safetensors"), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "saved at rank 4 from the trained rank 8 by SVD" in out and "OK: every front end merges" in out
    assert main(["inspect", str(tmp_path / "run/adapters/test.safetensors")]) == 0
    assert EXPORT_RANK_KEY in capsys.readouterr().out
