"""Seconds per optimizer step of the quick start, with and without the latent cache, and the data share.

Each case is a separate ``dora-studio train`` process on presets/quickstart.toml pinned to the settings
these numbers were first measured with (built-in tiny model, epsilon, DoRA rank 4 on attention;
datasets_example/, batch 4), one epoch, no sampling. Reported: median seconds per step over
the epoch's steps after the first 3, and the share of step time spent waiting for data
(``data_seconds / seconds`` from metrics.jsonl).

    python bench/train_speed.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "latents cached": ["dataset.cache_latents=true", "dataset.loader_workers=0"],
    "no latent cache": ["dataset.cache_latents=false", "dataset.loader_workers=0"],
    "no latent cache, 2 workers": ["dataset.cache_latents=false", "dataset.loader_workers=2"],
}
COMMON = [
    "training.epochs=1",
    "sampling.every_n_epochs=0",
    "sampling.at_start=false",
    "saving.save_state=false",
    "model.path=builtin:tiny-sdxl",
    "model.prediction_type=epsilon",
    "model.zero_terminal_snr=false",
    "network.rank=4",
    "network.alpha=4",
    "network.unet_targets=attn",
]
WARMUP_STEPS = 3


def run_case(overrides: list[str], work: Path) -> dict:
    run_dir = work / "run"
    args = [
        sys.executable,
        "-m",
        "trainer.cli",
        "train",
        str(REPO / "presets/quickstart.toml"),
        "--no-progress",
        "--run-dir",
        str(run_dir),
    ]
    for override in [*COMMON, *overrides, f"dataset.latent_cache_dir={work / 'latents'}"]:
        args += ["--set", override]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][WARMUP_STEPS:]
    return {
        "seconds_per_step": statistics.median(row["seconds"] for row in rows),
        "data_share": sum(row["data_seconds"] for row in rows) / sum(row["seconds"] for row in rows),
        "steps": len(rows),
    }


def main() -> None:
    results = {}
    for name, overrides in CASES.items():
        with tempfile.TemporaryDirectory() as work:
            results[name] = run_case(overrides, Path(work))
        r = results[name]
        print(
            f"{name:<28} {r['seconds_per_step']:.3f} s/step   data loading {100 * r['data_share']:.1f}% "
            f"of step time ({r['steps']} steps)",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
