"""What the Configure tab says about memory before Start: ``dora-studio estimate`` on the form's settings.

The estimate builds the model on fake tensors (a minute or two for SDXL on a laptop CPU), so it runs in its
own process, as ``verify`` does: the UI never holds a model. A result is kept per settings (by their
digest), so asking again for the same form answers at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from trainer.config.presets import config_toml
from trainer.config.schema import TrainConfig
from trainer.files import write_bytes_atomically

ESTIMATE_TIMEOUT_S = 900
CARDS_GB = (8, 12, 16, 24)  # the cards artists ask about
CUDA_CONTEXT_GB = 0.5  # what the CUDA context and allocator take before training does (about, on consumer cards)
ITEMS = {
    "adapter_gb": "adapter",
    "gradients_gb": "gradients",
    "optimizer_state_gb": "optimizer state",
    "activations_gb": "activations and temporaries",
}


def estimate(config: TrainConfig, workdir: Path) -> dict:
    """``dora-studio estimate --json`` for ``config`` (``{"error": ...}`` when it fails), cached in ``workdir``."""
    text = config_toml(config)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cached = workdir / f"estimate-{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    preset = workdir / f"estimate-{digest}.toml"
    write_bytes_atomically(preset, [text.encode()])
    command = [sys.executable, "-m", "trainer.cli", "estimate", str(preset)]
    model_is_here = _model_is_here(config.model.path)
    command += ([] if model_is_here else ["--architecture", "sdxl"]) + ["--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ESTIMATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"the estimate took longer than {ESTIMATE_TIMEOUT_S // 60} minutes"}
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "the estimate failed"}
    result["from_sdxl_configs"] = not model_is_here
    write_bytes_atomically(cached, [json.dumps(result).encode()])
    return result


def _model_is_here(path: str) -> bool:
    """A built-in model or a file/folder on this machine; otherwise (a preset's placeholder path, a model not
    downloaded yet) the estimate uses SDXL's own configs, as ``estimate --architecture sdxl`` does."""
    return path.startswith("builtin:") or Path(path).expanduser().exists()


def cards_line(peak_gb: float) -> str:
    """Which common cards the run fits on, their memory less what CUDA itself takes."""
    marks = [f"{card} GB {'✓' if peak_gb + CUDA_CONTEXT_GB <= card * 1024**3 / 1e9 else '✗'}" for card in CARDS_GB]
    return "Fits on: " + " · ".join(marks)


def format_markdown(result: dict) -> str:
    """The items as a table, the peak against the GPU's memory, and what to change when it does not fit."""
    if "error" in result:
        return f"**Could not estimate memory:** {result['error']}"
    width, height = result["bucket"]
    rows = [f"| {name} weights | {size:.2f} GB |" for name, size in result["base_weights_gb"].items()]
    rows += [f"| {label} | {result[key]:.2f} GB |" for key, label in ITEMS.items()]
    rows.append(f"| **training step** | **{result['training_peak_gb']:.2f} GB** |")
    if result["sampling_peak_gb"] is not None:
        rows.append(f"| **sampling** | **{result['sampling_peak_gb']:.2f} GB** |")
    device = result.get("device_memory_gb")
    verdict = f"Estimated peak **{result['peak_gb']:.2f} GB**"
    verdict += f" of this GPU's {device:.1f} GB." if device else " (no GPU here to compare with)."
    lines = [verdict, "", cards_line(result["peak_gb"]), "",
             f"At the largest bucket, {width}x{height}, batch {result['batch_size']}:", "",
             "| on the GPU | |", "|---|---|", *rows]  # fmt: skip
    if result.get("from_sdxl_configs"):
        lines += ["", "The model is not on this machine: estimated from SDXL's own configs."]
    if result.get("offloaded"):
        lines += ["", f"In CPU memory while training: {', '.join(result['offloaded'])}."]
    if device and not result.get("fits", True):
        lines += ["", "**This run will not fit.** What would bring it down:"]
        lines += [f"- {tip}" for tip in result.get("advice", [])]
    return "\n".join(lines)
