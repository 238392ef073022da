"""What the Export tab says about an adapter and a run: ``inspect``, ``verify`` and ``analyze --run``; and the
files it makes from an adapter: ``resize`` and ``convert``.

Verification, analysis and the tools load the base model, so they run as ``dora-studio`` commands in their
own process (the UI never holds a model). Their results are kept to be shown again: ``NAME.verify.json``
beside the adapter, ``analysis/decomposition.json`` and its PNG in the run folder, made files in ``exports/``.
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
from trainer.kohya.analyze import PLOT_FILE, RESULT_FILE
from trainer.kohya.inspect import format_summary, summarize
from trainer.runs.run_directory import RunDirectory

VERIFY_TIMEOUT_S = 1800
ANALYZE_TIMEOUT_S = 3600  # every checkpoint of a long run, merged layer by layer on the CPU
SHOWN_BLOCKS = 6


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


def _model_args(run: RunDirectory) -> list[str]:
    """``--model`` (and ``--config-dir``) of the run's base model, for a command that merges its adapters."""
    model = tomllib.loads(run.config_path.read_text(encoding="utf-8"))["model"]
    return ["--model", model["path"], *(["--config-dir", model["config_dir"]] if model.get("config_dir") else [])]


def verify_adapter(run: RunDirectory, path: Path, now: bool) -> str:
    """The stored verify result of ``run``'s adapter ``path``; with ``now``, verify it against the run's base
    model first and store the result."""
    cache = RunDirectory.verify_result_path(path)
    if not now:
        return _format(json.loads(cache.read_text())) if cache.is_file() else "Not verified yet."
    command = [sys.executable, "-m", "trainer.cli", "verify", str(path), *_model_args(run), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        result = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "verify failed"}
    write_bytes_atomically(cache, [json.dumps(result).encode()])
    return _format(result)


def _format_analysis(result: dict) -> str:
    """The slope per layer type and the most turned blocks of the last checkpoint, for the tab."""
    axis, last = result["axis"], result["last"]
    lines = [f"{len(result['checkpoints'])} checkpoints, {result['kind']} ({axis} axis)", "", "slope of ΔM against ΔD:"]
    for kind, fits in result["by_type"].items():
        fit = fits[axis]
        lines.append(f"  {kind:<6}" + ("-" if fit["slope"] is None else f"{fit['slope']:.3g} (r {fit['r']:+.2f})"))
    lines += ["", f"{last['file']}, most turned blocks:"]
    lines += [
        f"  {block['name']:<22}ΔD {block[axis]['dD']:.2e}  ΔM {block[axis]['dM']:.2e}"
        for block in last["by_block"][:SHOWN_BLOCKS]
    ]
    return "\n".join(lines)


def _cli_error(stderr: str) -> str:
    """The command's own ``error:`` message (the lines from it on), not the library chatter before it."""
    lines = stderr.strip().splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    return "\n".join(lines[starts[-1] :]) if starts else (lines[-1] if lines else "the command failed")


def analyze_run(run: RunDirectory, now: bool) -> tuple[str | None, str]:
    """The run's decomposition plot and its summary, as stored; with ``now``, analyze every adapter it saved
    first (``analyze --run`` stores them in the run folder)."""
    if now:
        command = [sys.executable, "-m", "trainer.cli", "analyze", "--run", str(run.root), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S)
        if done.returncode != 0:
            return None, _cli_error(done.stderr)
        result = json.loads(done.stdout)
    else:
        try:
            result = json.loads((run.analysis_dir / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, "Not analyzed yet."
    return str(run.analysis_dir / PLOT_FILE), _format_analysis(result)


def make_from_adapter(run: RunDirectory, path: Path, tool: str, rank: int | None) -> tuple[str, Path | None]:
    """``dora-studio resize`` or ``convert`` on ``run``'s adapter ``path`` (``tool``: one of ``TOOLS``), written to
    ``exports/`` under a name no file has yet; (what the command printed or its error, the new file or None)."""
    if tool not in TOOLS:
        return f"Choose one of: {', '.join(TOOLS)}.", None
    if (rank is not None and rank < 1) or (tool == "resize" and rank is None):
        return "Give a rank of at least 1" + (" to resize to." if tool == "resize" else "."), None
    command, options, label = TOOLS[tool](rank)
    run.exports_dir.mkdir(parents=True, exist_ok=True)
    out = run.exports_dir / f"{path.stem}-{label}.safetensors"
    for number in range(2, 1000):
        if not out.exists():
            break
        out = run.exports_dir / f"{path.stem}-{label}-{number}.safetensors"
    line = [sys.executable, "-m", "trainer.cli", command, str(path), *options, *_model_args(run), "--out", str(out)]
    done = subprocess.run(line, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    if done.returncode != 0:
        return _cli_error(done.stderr), None
    return done.stdout.strip(), out


TOOLS = {  # what each Export-tab choice runs given the rank field: the command, its options, its file's label
    "resize": lambda rank: ("resize", ["--rank", str(rank)], f"r{rank}"),
    "convert to DoRA": lambda rank: ("convert", ["--to", "dora"], "dora"),
    "convert to LoRA": lambda rank: ("convert", ["--to", "lora", *(["--rank", str(rank)] if rank else [])],
                                     f"lora-r{rank}" if rank else "lora"),
}  # fmt: skip
