"""What the Export tab says about an adapter: the ``inspect`` summary and the ``verify`` result.

Verification loads the base model, so it runs as ``dora-studio verify`` in its own process (the UI never
holds a model) and its result is kept beside the adapter as ``NAME.verify.json`` to be shown again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from trainer.errors import AdapterFileError
from trainer.files import write_bytes_atomically
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.inspect import format_summary, summarize
from trainer.runs.run_directory import RunDirectory

VERIFY_TIMEOUT_S = 1800


def adapter_summary(path: Path) -> str:
    try:
        return format_summary(summarize(load_adapter(path)))
    except AdapterFileError as error:
        return str(error)


def _format(result: dict) -> str:
    if "error" in result:
        return result["error"]
    verdict = "OK: every front end merges this file to our weights" if result["ok"] else "MISMATCH"
    lines = [verdict, f"{result['stems_checked']} stems checked, tolerance {result['tolerance']:g}"]
    lines += [
        f"{r['front_end']:<14} strength {r['strength']:<4} max relative error {r['max_rel_error']:.2e}"
        for r in result["results"]
    ]
    return "\n".join(lines)


def verify_adapter(run: RunDirectory, path: Path, now: bool) -> str:
    """The stored verify result of ``run``'s adapter ``path``; with ``now``, verify it against the run's base
    model first and store the result."""
    cache = RunDirectory.verify_result_path(path)
    if not now:
        return _format(json.loads(cache.read_text())) if cache.is_file() else "Not verified yet."
    config = tomllib.loads(run.config_path.read_text(encoding="utf-8"))
    command = [sys.executable, "-m", "trainer.cli", "verify", str(path), "--model", config["model"]["path"], "--json"]
    if config["model"].get("config_dir"):
        command += ["--config-dir", config["model"]["config_dir"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        result = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "verify failed"}
    write_bytes_atomically(cache, [json.dumps(result).encode()])
    return _format(result)
