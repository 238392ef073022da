"""The run directory: status merged and replaced atomically, metrics as whole JSON lines, commands as files."""

import json
import os

import pytest

import trainer.files
from trainer.runs.run_directory import COMMANDS, STATES, RunDirectory


@pytest.fixture
def run(tmp_path):
    run = RunDirectory(tmp_path / "runs" / "one")
    run.create()
    return run


def test_create_makes_the_layout(tmp_path):
    run = RunDirectory(tmp_path / "runs" / "one")
    run.create()
    run.create()  # idempotent: a resume creates again
    for name in ("samples", "adapters", "state", "commands"):
        assert (run.root / name).is_dir()
    assert run.status_path == run.root / "status.json"
    assert run.metrics_path == run.root / "metrics.jsonl"
    assert run.config_path == run.root / "config.toml"


def test_status_is_merged_into_the_file(run):
    assert run.read_status() == {}  # no status yet
    first = run.write_status(state="caching", total_steps=40)
    second = run.write_status(state="training", step=3)
    on_disk = json.loads(run.status_path.read_text())
    assert on_disk == second
    assert on_disk["state"] == "training" and on_disk["step"] == 3
    assert on_disk["total_steps"] == 40  # kept from the first write
    assert on_disk["pid"] == os.getpid()
    assert on_disk["updated_at"] >= first["updated_at"]
    assert run.read_status() == on_disk
    run.write_status(message="saving soon")  # fields other than the state need no state
    assert run.read_status()["state"] == "training"


@pytest.mark.parametrize("state", STATES)
def test_every_known_state_is_accepted(run, state):
    assert run.write_status(state=state)["state"] == state


def test_unknown_state_is_refused_and_leaves_the_file_alone(run):
    run.write_status(state="training", step=5)
    before = run.status_path.read_bytes()
    with pytest.raises(ValueError, match="paused"):
        run.write_status(state="paused", step=6)
    assert run.status_path.read_bytes() == before


def test_unreadable_status_reads_as_empty(run):
    run.status_path.write_text('{"state": "train')  # e.g. written by hand, or by an old version, and cut short
    assert run.read_status() == {}
    assert run.write_status(state="training")["state"] == "training"  # and can be written over


def test_status_write_is_atomic(run, monkeypatch):
    run.write_status(state="training", step=1)
    before = run.status_path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        run.write_status(state="training", step=2)
    assert run.status_path.read_bytes() == before  # a reader still sees the whole old status
    assert sorted(p.name for p in run.root.iterdir() if p.is_file()) == ["status.json"]  # no temp file left


def read_metrics(run):
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


def test_metrics_are_appended_one_line_per_step(run):
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 0.5 / step})
    assert read_metrics(run) == [{"step": s, "loss": 0.5 / s} for s in (1, 2, 3)]
    assert run.metrics_path.read_text().endswith("\n")


def test_truncate_metrics_drops_later_steps_and_a_torn_line(run):
    for step in range(1, 6):
        run.append_metrics({"step": step, "loss": float(step)})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 6, "lo')  # the process died mid-line
    run.truncate_metrics(after_step=3)
    assert read_metrics(run) == [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    run.append_metrics({"step": 4, "loss": 40.0})  # a resume appends onto whole lines only
    assert read_metrics(run)[-1] == {"step": 4, "loss": 40.0}
    assert len(read_metrics(run)) == 4


def test_truncate_metrics_keeps_everything_up_to_the_step_byte_for_byte(run):
    for step in (1, 2):
        run.append_metrics({"step": step, "loss": 0.1, "lr": [1e-4, 5e-5]})
    before = run.metrics_path.read_bytes()
    run.truncate_metrics(after_step=2)
    assert run.metrics_path.read_bytes() == before
    run.truncate_metrics(after_step=0)
    assert run.metrics_path.read_text() == ""


def test_truncate_metrics_without_a_file_does_nothing(run):
    run.truncate_metrics(after_step=10)
    assert not run.metrics_path.exists()


def test_torn_line_in_the_middle_is_dropped_too(run):
    run.metrics_path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    run.truncate_metrics(after_step=5)
    assert read_metrics(run) == [{"step": 1}, {"step": 3}]


def test_commands_are_sent_and_taken_once(run):
    assert run.take_commands() == set()
    run.send_command("stop")
    run.send_command("sample")
    assert (run.commands_dir / "stop").is_file()
    assert run.take_commands() == {"stop", "sample"}
    assert run.take_commands() == set()  # each taken once
    assert list(run.commands_dir.iterdir()) == []


def test_sending_a_command_twice_gives_it_once(run):
    run.send_command("save")
    run.send_command("save")
    assert run.take_commands() == {"save"}


@pytest.mark.parametrize("name", ["pause", "../stop", "STOP", ""])
def test_unknown_command_is_refused(run, name):
    with pytest.raises(ValueError, match="unknown command"):
        run.send_command(name)
    assert list(run.commands_dir.iterdir()) == []
    assert not (run.root / "stop").exists()


def test_unknown_files_in_commands_are_left_alone(run):
    (run.commands_dir / "notes.txt").write_text("mine")
    (run.commands_dir / "stop").write_text("")  # dropped by hand, not through send_command
    assert run.take_commands() == {"stop"}
    assert (run.commands_dir / "notes.txt").read_text() == "mine"


def test_commands_are_the_documented_three():
    assert set(COMMANDS) == {"stop", "save", "sample"}


def test_commands_work_before_the_folder_exists(tmp_path):
    run = RunDirectory(tmp_path / "fresh")
    assert run.take_commands() == set()
    run.send_command("stop")  # the UI may send before the trainer created the folders
    assert run.take_commands() == {"stop"}
