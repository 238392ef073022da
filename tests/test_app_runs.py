"""app.runs against run folders written by hand: fresh, torn, running, killed, finished and failed runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import runs
from app.runs import (
    Sample,
    active_run,
    format_eta,
    kept_or,
    list_runs,
    log_tail,
    loss_curves,
    pid_alive,
    read_adapters,
    read_metrics,
    read_samples,
    read_status,
    run_label,
    sample_grid,
    samples_for_prompt,
    signature,
)
from trainer.errors import RunNameError
from trainer.runs.run_directory import RunDirectory, validate_run_name


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_run(runs_dir: Path, name: str, age_s: float = 0.0, **status) -> Path:
    """A run folder; ``status`` fields become status.json (none: no status.json at all)."""
    root = runs_dir / name
    root.mkdir(parents=True)
    (root / "config.toml").write_text("")
    if status:
        status.setdefault("updated_at", time.time() - age_s)
        (root / "status.json").write_text(json.dumps(status))
    stamp = time.time() - age_s
    os.utime(root, (stamp, stamp))
    return root


def write_samples(root: Path, folder: str, prompts: list[str] | None, mtime: float, count: int = 2) -> None:
    out = root / "samples" / folder
    out.mkdir(parents=True)
    for index in range(count):
        (out / f"{index:02d}.png").write_bytes(b"png")
    if prompts is not None:
        (out / "prompts.json").write_text(
            json.dumps([{"file": f"{i:02d}.png", "prompt": p, "seed": i} for i, p in enumerate(prompts)])
        )
    os.utime(out, (mtime, mtime))


# -- status -------------------------------------------------------------------------------------------


def test_fresh_folder_without_status_is_starting_then_unknown(tmp_path):
    fresh = make_run(tmp_path, "fresh")
    assert read_status(fresh).state == "starting"
    old = make_run(tmp_path, "old", age_s=600)
    assert read_status(old).state == "unknown"
    assert read_status(tmp_path / "missing").state == "unknown"  # never raises


def test_torn_status_json_is_treated_as_missing(tmp_path):
    root = make_run(tmp_path, "torn")
    (root / "status.json").write_text('{"state": "training", "step": 1')
    assert read_status(root).state == "starting"
    (root / "status.json").write_text('["not", "a", "dict"]')
    assert read_status(root).state == "starting"


def test_running_run_with_live_pid(tmp_path):
    root = make_run(
        tmp_path,
        "live",
        state="training",
        step=120,
        total_steps=1000,
        epoch=2,
        epochs=10,
        eta_seconds=200.0,
        loss=0.0812,
        message="step 120/1000",
        pid=os.getpid(),
    )
    status = read_status(root)
    assert (status.state, status.alive, status.step, status.total_steps, status.epoch) == (
        "training",
        True,
        120,
        1000,
        2,
    )
    assert status.loss == pytest.approx(0.0812) and status.eta_seconds == 200.0
    assert status.message == "step 120/1000"


def test_active_state_with_dead_pid_is_died_with_resume_hint(tmp_path):
    root = make_run(tmp_path, "killed", state="training", step=40, eta_seconds=99.0, pid=dead_pid())
    status = read_status(root)
    assert status.state == "died" and not status.alive and status.eta_seconds is None
    assert f"dora-studio train --run-dir {root} --resume auto" in status.message
    assert "Resume" in status.message and "step 40" in status.message


def test_finished_and_failed_runs_keep_their_state(tmp_path):
    done = make_run(tmp_path, "done", state="done", step=10, last_adapter="adapters/x.safetensors", pid=dead_pid())
    assert read_status(done).state == "done" and read_status(done).last_adapter == "adapters/x.safetensors"
    failed = make_run(tmp_path, "failed", state="failed", message="CUDA out of memory", pid=dead_pid())
    assert (read_status(failed).state, read_status(failed).message) == ("failed", "CUDA out of memory")


def test_odd_status_values_do_not_raise(tmp_path):
    root = make_run(tmp_path, "odd", state="training", step="7", loss=None, pid=True, eta_seconds=float("nan"))
    status = read_status(root)
    assert (status.state, status.step, status.loss, status.pid, status.eta_seconds) == ("died", 0, None, None, None)


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(None) and not pid_alive(0) and not pid_alive(-1) and not pid_alive(dead_pid())
    assert not pid_alive(2**80)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie detection reads /proc")
def test_unreaped_child_is_not_alive():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not pid_alive(process.pid)
    finally:
        process.wait()


def test_pid_alive_true_on_permission_error(monkeypatch):
    def refuse(pid, sig):
        raise PermissionError

    monkeypatch.setattr(runs.os, "kill", refuse)
    monkeypatch.setattr(runs, "_zombie", lambda pid: False)
    assert pid_alive(1)


# -- metrics, samples, adapters ---------------------------------------------------------------------


def test_metrics_skip_torn_lines_and_filter_steps(tmp_path):
    root = make_run(tmp_path, "m")
    lines = [json.dumps({"step": s, "epoch": 1, "loss": 0.1 * s, "lr": {"unet": 1e-4}}) for s in (1, 2, 3)]
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n" + '{"step": 4, "loss"')
    assert [r["step"] for r in read_metrics(root)] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(root, after_step=2)] == [3]
    assert read_metrics(tmp_path / "nothing") == []


def test_samples_newest_first_with_labels_and_prompts(tmp_path):
    root = make_run(tmp_path, "s")
    now = time.time()
    write_samples(root, "epoch_000", ["a cat", "a dog"], now - 50)
    write_samples(root, "epoch_001", ["a cat", "a dog"], now - 40)
    write_samples(root, "step_000120", None, now - 30)  # prompts.json not written yet
    write_samples(root, "epoch_002", ["a cat", "a dog"], now - 20)
    (root / "samples" / "epoch_002" / ".00.png.abc123.tmp").write_bytes(b"")
    (root / "samples" / "notes").mkdir()
    samples = read_samples(root)
    assert [(s.epoch_label, s.index) for s in samples] == [
        ("epoch 2", 0),
        ("epoch 2", 1),
        ("step 120", 0),
        ("step 120", 1),
        ("epoch 1", 0),
        ("epoch 1", 1),
        ("base model", 0),
        ("base model", 1),
    ]
    assert [s.prompt for s in samples[:4]] == ["a cat", "a dog", "", ""]
    assert samples[0].path == root / "samples" / "epoch_002" / "00.png"
    dogs = samples_for_prompt(samples, 1)
    assert [s.epoch_label for s in dogs] == ["base model", "epoch 1", "step 120", "epoch 2"]
    assert all(s.index == 1 for s in dogs)
    assert read_samples(tmp_path / "nothing") == []


def test_base_model_is_oldest_even_with_a_newer_mtime(tmp_path):
    root = make_run(tmp_path, "b")
    write_samples(root, "epoch_001", ["x"], time.time() - 100, count=1)
    write_samples(root, "epoch_000", ["x"], time.time(), count=1)
    assert [s.epoch_label for s in read_samples(root)] == ["epoch 1", "base model"]


def test_adapters_newest_first_without_temp_files(tmp_path):
    root = make_run(tmp_path, "a")
    adapters = root / "adapters"
    adapters.mkdir()
    for age, name in (
        (30, "me-epoch001.safetensors"),
        (10, "me.safetensors"),
        (20, "me-epoch002.safetensors"),
        (0, ".me.safetensors.1a2b.tmp"),
        (0, ".hidden.safetensors"),
    ):
        (adapters / name).write_bytes(b"x")
        os.utime(adapters / name, (time.time() - age, time.time() - age))
    assert [p.name for p in read_adapters(root)] == [
        "me.safetensors",
        "me-epoch002.safetensors",
        "me-epoch001.safetensors",
    ]
    assert read_adapters(tmp_path / "nothing") == []


# -- logs ---------------------------------------------------------------------------------------------


def test_log_tail_of_a_running_run_shows_train_log_only(tmp_path):
    root = make_run(tmp_path, "r", state="training", pid=os.getpid())
    (root / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    (root / "console.log").write_text("progress 1%\rprogress 50%\n")
    assert log_tail(root, lines=3) == "line 97\nline 98\nline 99"


def test_log_tail_of_a_failed_run_includes_console_traceback(tmp_path):
    root = make_run(tmp_path, "f", state="failed", message="boom", pid=dead_pid())
    (root / "train.log").write_text("started\nstep 1\n")
    (root / "console.log").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    tail = log_tail(root)
    assert tail.startswith("started\nstep 1")
    assert "--- console.log ---" in tail and tail.endswith("RuntimeError: boom")


def test_log_tail_falls_back_to_console_when_no_train_log(tmp_path):
    root = make_run(tmp_path, "c")
    (root / "console.log").write_text("ImportError: no module named torch\n")
    assert log_tail(root) == "ImportError: no module named torch"
    assert log_tail(tmp_path / "nothing") == ""


def test_log_tail_keeps_last_redraw_of_progress_lines(tmp_path):
    root = make_run(tmp_path, "p", state="died", pid=dead_pid())
    (root / "train.log").write_text("a\r\nb\n 10%|#   \r 50%|#####  \n")
    assert log_tail(root) == "a\nb\n 50%|#####  "


def test_log_tail_reads_only_the_end_of_a_big_file(tmp_path, monkeypatch):
    root = make_run(tmp_path, "big")
    line = "x" * 99 + "\n"
    with (root / "train.log").open("w") as f:
        f.write(line * 50_000 + "second to last\nthe end\n")  # ~5 MB
    monkeypatch.setattr(runs, "LOG_READ_LIMIT", 4096)
    read_sizes = []
    real_open = Path.open

    def spying_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read
        handle.read = lambda *a: read_sizes.append(len(data := real_read(*a))) or data
        return handle

    monkeypatch.setattr(Path, "open", spying_open)
    tail = log_tail(root, lines=2)
    assert tail == "second to last\nthe end"
    assert read_sizes and max(read_sizes) <= 4096


# -- listing ------------------------------------------------------------------------------------------


def test_list_runs_newest_first_skipping_hidden_invalid_and_plain_folders(tmp_path):
    make_run(tmp_path, "old-run", state="done", updated_at=time.time() - 500, pid=dead_pid())
    make_run(tmp_path, "new-run", state="stopped", updated_at=time.time() - 5, pid=dead_pid())
    make_run(tmp_path, "no-status", age_s=100)  # config.toml only: dated by the folder
    preset_only = tmp_path / "preset-only"
    preset_only.mkdir()
    (preset_only / "preset.toml").write_text("")
    make_run(tmp_path, ".hidden", state="done")
    make_run(tmp_path, "has space", state="done")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "file.txt").write_text("")
    assert [r.name for r in list_runs(tmp_path)] == ["preset-only", "new-run", "no-status", "old-run"]
    assert list_runs(tmp_path / "missing") == []


def test_list_runs_skips_symlinks(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "real", state="done")
    outside = make_run(tmp_path, "outside", state="done")
    (runs_dir / "alias").symlink_to(runs_dir / "real")
    (runs_dir / "escape").symlink_to(outside)
    assert [r.name for r in list_runs(runs_dir)] == ["real"]


def test_active_run_is_the_live_one(tmp_path):
    make_run(tmp_path, "dead", state="training", updated_at=time.time(), pid=dead_pid())
    make_run(tmp_path, "finished", state="done", pid=os.getpid())
    assert active_run(tmp_path) is None
    make_run(tmp_path, "live", state="sampling", updated_at=time.time() - 60, pid=os.getpid())
    assert active_run(tmp_path).name == "live"


# -- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["my-run_2024.01", "A", "a" * 100, "a..b"])
def test_valid_names(tmp_path, name):
    assert validate_run_name(name) == name
    assert RunDirectory.named(tmp_path, name).root == tmp_path.resolve() / name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a/../b",
        "/etc",
        "x/y",
        "x\\y",
        ".hidden",
        "-rf",
        "has space",
        "run\n",
        "caf\u00e9",
        "\uff41bc",
        "a\u200bb",
        "a" * 101,
        None,
        5,
    ],
)
def test_invalid_names(tmp_path, name):
    with pytest.raises(RunNameError):
        validate_run_name(name)
    with pytest.raises(ValueError):
        RunDirectory.named(tmp_path, name)


def test_run_path_refuses_symlink_out_but_allows_one_inside(tmp_path):
    runs_dir = tmp_path / "runs"
    (runs_dir / "real").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (runs_dir / "escape").symlink_to(tmp_path / "secret")
    (runs_dir / "alias").symlink_to(runs_dir / "real")
    with pytest.raises(RunNameError):
        RunDirectory.named(runs_dir, "escape")
    assert RunDirectory.named(runs_dir, "alias").root == (runs_dir / "real").resolve()


# -- polling ------------------------------------------------------------------------------------------


def test_signature_changes_only_when_outputs_change(tmp_path):
    root = make_run(tmp_path, "sig", state="training", pid=os.getpid())
    first = signature(root)
    assert signature(root) == first
    with (root / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 1, "loss": 0.1}) + "\n")
    grown = signature(root)
    assert grown != first and signature(root) == grown
    write_samples(root, "epoch_001", None, time.time())
    with_samples = signature(root)
    assert with_samples != grown
    (root / "samples" / "epoch_001" / "prompts.json").write_text("[]")
    assert signature(root) != with_samples
    assert signature(tmp_path / "missing") == signature(tmp_path / "missing")


def test_signature_notices_a_killed_trainer(tmp_path, monkeypatch):
    """SIGKILL changes no file, yet the UI must redraw the run as died."""
    root = make_run(tmp_path, "k", state="training", pid=os.getpid())
    alive = signature(root)
    monkeypatch.setattr(runs, "pid_alive", lambda pid: False)
    assert signature(root) != alive and signature(root)[-1] == "died"


@pytest.mark.parametrize(
    "seconds, text",
    [
        (None, ""),
        (float("nan"), ""),
        (-1, ""),
        (0, "0 s"),
        (45.4, "45 s"),
        (200, "3 min 20 s"),
        (65, "1 min 05 s"),
        (3599.4, "59 min 59 s"),
        (3900, "1 h 05 min"),
        (3599.6, "1 h 00 min"),
        (90000, "25 h 00 min"),
    ],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_loss_curves_plot_training_and_validation_apart():
    metrics = [
        {"step": 0, "validation_loss": 0.5},
        {"step": 1, "loss": 0.9, "lr": {}},
        {"step": 2, "loss": 0.7},
        {"step": 2, "validation_loss": 0.4},
        {"step": 3, "loss": None},  # nothing to draw
    ]
    smooth_2 = (0.9 * 0.1 * 0.9 + 0.1 * 0.7) / (1 - 0.9**2)  # TensorBoard's debiased average of 0.9 then 0.7
    assert loss_curves(metrics) == {
        "step": [0, 1, 2, 2, 1, 2],
        "loss": [0.5, 0.9, 0.7, 0.4, pytest.approx(0.9), pytest.approx(smooth_2)],
        "series": ["validation", "training", "training", "validation", "training, smoothed", "training, smoothed"],
    }
    assert smooth_2 == pytest.approx((0.9 * 0.9 + 0.7) / 1.9)  # the weights of a debiased average: 0.9 and 1


def test_the_sample_grid_is_a_row_per_prompt_and_the_newest_samplings_at_the_right():
    samples = [
        Sample(Path(f"{order}-{index}.png"), f"epoch {order}", order, index, "p")
        for order in range(10)
        for index in (1, 0)
    ]
    grid, columns = sample_grid(samples, max_columns=3)
    assert columns == 3
    assert [(s.index, s.order) for s in grid] == [(0, 7), (0, 8), (0, 9), (1, 7), (1, 8), (1, 9)]
    assert sample_grid([]) == ([], 1)


def test_a_dropdown_keeps_the_users_choice_else_the_preferred_else_the_first():
    assert kept_or("b", ["a", "b"], preferred="a") == "b"
    assert kept_or("gone", ["a", "b"], preferred="b") == "b"
    assert kept_or(None, ["a", "b"], preferred="missing") == "a"
    assert kept_or(None, []) is None


def test_the_run_picker_names_kind_rank_and_date(tmp_path):
    root = make_run(tmp_path, "my-run", state="done", updated_at=1.8e9)
    (root / "config.toml").write_text('[network]\nkind = "dora"\nrank = 16\n')
    assert run_label(read_status(root), tmp_path).startswith("my-run · dora r16 · 2027-")  # 1.8e9 s: January 2027
    (root / "preset.toml").write_text('[network]\nkind = "lora"\nrank = 8\n')  # what the studio started it with
    assert run_label(read_status(root), tmp_path).startswith("my-run · lora r8 · ")
    for path in (root / "preset.toml", root / "config.toml"):
        path.write_text("not toml [")
    assert run_label(read_status(root), tmp_path).count(" · ") == 1  # name and date: no kind to say
