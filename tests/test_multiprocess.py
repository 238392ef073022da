"""Two training processes on CPU (gloo) train what one process trains with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from PIL import Image
from safetensors.torch import load_file
from test_training import metrics, settings, train

from trainer.errors import TrainStateError

REPO = Path(__file__).resolve().parents[1]
# Two processes each sum half of every batch's gradients and then add the halves, where one process sums
# them all at once: float32 addition in another order, about 1e-7 relative per step, which Adam's
# normalised steps carry along. After 6 steps the adapters agree to well under 1e-4 of their scale.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory) -> Path:
    """9 images per epoch in one bucket: global batches of 4, 4 and 1, so one process gets a stand-in."""
    root = tmp_path_factory.mktemp("odd")
    for folder, _repeats, count in (("2_pair", 2, 4), ("1_single", 1, 1)):
        (root / folder).mkdir()
        for index in range(count):
            image = Image.new("RGB", (64, 64), (40 * index + 20, 90, 200 - 30 * index))
            image.paste((250, 250, 250), (8 * index, 8, 8 * index + 20, 30))
            image.save(root / folder / f"img{index}.png")
            (root / folder / f"img{index}.txt").write_text(f"{folder} image {index}")
    return root


def _preset(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "preset.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _cli(preset: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainer.cli", "train", str(preset), "--run-dir", str(run_dir), "--no-progress"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dir, odd_dataset, tmp_path):
    data = settings(
        tiny_dir,
        odd_dataset,
        tmp_path / "cache",
        training={"epochs": 2, "batch_size": 4},
        saving={"save_dtype": "fp32"},
        sampling={"prompts": []},
        dataset={"flip": True},
    )
    one = train(data, tmp_path / "one")

    two_dir = tmp_path / "two"
    process = _cli(_preset(tmp_path, data), two_dir, "training.processes=2", "training.batch_size=2")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr.decode()[-3000:]

    assert [row["step"] for row in metrics(two_dir)] == list(range(1, 7))  # written once, by one process
    ones, twos = metrics(tmp_path / "one"), metrics(two_dir)
    assert [row["loss"] for row in twos] == pytest.approx([row["loss"] for row in ones], rel=1e-4)
    log_lines = (two_dir / "train.log").read_text().splitlines()
    assert sum("optimizer steps in all" in line for line in log_lines) == 1
    assert json.loads((two_dir / "status.json").read_text())["processes"] == 2

    a, b = load_file(one), load_file(two_dir / "adapters/test.safetensors")
    assert a.keys() == b.keys()
    scale = max(t.abs().max().item() for t in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two processes vs one: max abs difference {worst:.3g}, {worst / scale:.3g} of the largest weight")
    assert worst <= TOLERANCE * scale, (worst, scale)
    assert any((a[k] != b[k]).any() for k in a if k.endswith("lora_up.weight")) or worst == 0


def test_resume_refuses_another_number_of_processes(tiny_dir, odd_dataset, tmp_path):

    data = settings(
        tiny_dir, odd_dataset, tmp_path / "cache", training={"epochs": 1, "batch_size": 2}, sampling={"prompts": []}
    )
    run_dir = tmp_path / "run"
    process = _cli(_preset(tmp_path, data), run_dir, "training.processes=2", "training.batch_size=1")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr.decode()[-3000:]
    with pytest.raises(TrainStateError, match="training.processes"):
        train(data, run_dir, resume="auto")


def test_a_killed_worker_fails_the_run_instead_of_hanging(tiny_dir, odd_dataset, tmp_path):
    data = settings(
        tiny_dir, odd_dataset, tmp_path / "cache", training={"epochs": 200, "batch_size": 2}, sampling={"prompts": []}
    )
    run_dir = tmp_path / "run"
    launcher = _cli(
        _preset(tmp_path, data),
        run_dir,
        "training.processes=2",
        "training.batch_size=1",
        "training.process_timeout_minutes=1",
    )
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir)) < 2:
            assert time.time() < deadline and launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        main_pid = json.loads((run_dir / "status.json").read_text())["pid"]
        # torchrun starts its workers as `python -u -m trainer.cli train ...`; the other one is rank 1
        workers = [
            int(pid)
            for pid in subprocess.run(
                ["pgrep", "-f", "python -u -m trainer.cli train"], capture_output=True, text=True
            ).stdout.split()
        ]
        others = [pid for pid in workers if pid != main_pid and _parent(pid) == _parent(main_pid)]
        assert len(others) == 1, (workers, main_pid)
        started = time.time()
        os.kill(others[0], signal.SIGKILL)
        launcher.communicate(timeout=150)
        assert launcher.returncode != 0
        assert time.time() - started < 150
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] in ("failed", "stopped"), status
        if status["state"] == "failed":
            assert "another training process stopped" in status["message"]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"trainer.cli train {tmp_path}"], check=False)  # no orphans


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
