"""``bench/sdxl_scale.py``: its ``--quick`` form runs each kind of method end to end on the tiny UNet (a smoke
test: the numbers of the tiny model mean nothing), and a method the kernel kills is reported, not raised."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import sdxl_scale  # noqa: E402


def test_sdxl_scale_quick(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(BENCH / "sdxl_scale.py"), "--quick", "--reps", "1",
               "--methods", "lora,qdora-nf4", "--json-out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["method"], row["checkpointing"]) for row in rows] == [
        ("lora", False), ("qdora-nf4", False), ("lora", True), ("qdora-nf4", True),
    ]  # fmt: skip
    assert all("error" not in row and row["seconds"] > 0 for row in rows)
    by_method = {row["method"]: row for row in rows if not row["checkpointing"]}
    assert by_method["qdora-nf4"]["weights_and_state_gb"] < by_method["lora"]["weights_and_state_gb"]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    methods = ["lora", "qdora-nf4"]
    assert set(summary) == {*methods, *(f"{method}-ckpt" for method in methods)}
    assert summary["lora"]["x_lora"] == 1.0


def test_a_method_killed_for_memory_is_reported(monkeypatch):
    def killed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -signal.SIGKILL, "", "")

    monkeypatch.setattr(sdxl_scale.subprocess, "run", killed)
    args = Namespace(device="cpu", size=256, dtype="fp32", reps=1, quick=False)
    row = sdxl_scale.run("peft-dora", False, args)
    assert row == {"method": "peft-dora", "checkpointing": False, "error": "out of memory (killed by the kernel)"}
