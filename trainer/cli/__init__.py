"""The ``dora-studio`` command. Each subcommand is a small function over the engine's modules; those over adapter
files live in ``cli.adapter_files``, the kohya config import in ``cli.import_kohya``, captioning in ``cli.caption``.

Subcommands import what they use when they run, so ``--help`` and ``settings`` answer without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from trainer.errors import StudioError, UsageError
from trainer.runs.run_directory import RunDirectory, new_run_name

from .adapter_files import add_adapter_file_commands
from .caption import add_caption_command
from .common import EXIT_BAD_INPUT, EXIT_OK
from .import_kohya import add_import_kohya_command


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from trainer.builtin.tiny import save_tiny_model

    out = save_tiny_model(Path(args.out_dir), seed=args.seed)
    print(f"tiny SDXL-structured model written to {out} (diffusers folder) and {out / 'tiny-sdxl.safetensors'}")
    return EXIT_OK


def cmd_make_toy_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from trainer.builtin.toy import TOY_ASSET
    from trainer.builtin.toy_pretrain import ToyRecipe, pretrain_toy_model, quick_recipe

    recipe = replace(ToyRecipe(), seed=args.seed)
    command = "dora-studio make-toy-model" + (f" --seed {args.seed}" if args.seed else "")
    if args.quick:
        recipe, command = quick_recipe(recipe), command + " --quick"
    out = Path(args.out) if args.out else TOY_ASSET
    pretrain_toy_model(out, recipe, command, log=lambda line: print(line, flush=True), device=torch.device(args.device))
    return EXIT_OK


def cmd_check_data(args: argparse.Namespace) -> int:
    from trainer.data.buckets import BucketSpec
    from trainer.data.check import check_dataset, format_report

    if args.preset:  # exactly what that run would see: its folder, captions, buckets and batch size
        from trainer.config.presets import load_config
        from trainer.training.dataset_config import check_configured

        config = load_config(args.preset, [f"dataset.path={args.dir}"] if args.dir else [])
        report = check_configured(config)
    else:
        if not args.dir:
            raise UsageError("give the dataset folder (or --preset PRESET to check the preset's dataset)")
        try:
            spec = BucketSpec(
                resolution=args.resolution, min_side=min(512, args.resolution), max_side=max(2048, args.resolution)
            )
        except ValueError as error:
            raise UsageError.at(f"--resolution {args.resolution}", str(error)) from None
        if args.batch_size < 1:
            raise UsageError.at(f"--batch-size {args.batch_size}", "must be 1 or more")
        report = check_dataset(Path(args.dir), args.caption_extension, spec, args.batch_size)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return EXIT_OK


def _train_config(args: argparse.Namespace):
    """The preset + --set, or, when resuming a run with no preset given, the run's own config.toml."""
    from trainer.config.presets import load_config

    if args.preset is None and args.resume and args.run_dir:
        return load_config(RunDirectory(Path(args.run_dir)).config_path, args.set)
    if args.preset is None:
        raise UsageError(
            "give a preset, e.g. `dora-studio train presets/quickstart.toml` (or --run-dir and "
            "--resume auto to continue a run with its saved settings)"
        )
    return load_config(args.preset, args.set)


def _run_directory(args: argparse.Namespace, output_name: str) -> RunDirectory:
    if args.run_dir:
        return RunDirectory(Path(args.run_dir))
    if args.resume and args.resume != "auto":
        return RunDirectory.of_state(Path(args.resume))
    if args.resume:
        raise UsageError.at("--resume auto", "needs --run-dir: the folder of the run to continue")
    return RunDirectory(Path(args.runs_dir) / new_run_name(Path(args.runs_dir), output_name))


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.runs.train_log import log_to
    from trainer.training.loop import Trainer
    from trainer.training.signals import StopRequested

    config = _train_config(args)
    run = _run_directory(args, config.saving.output_name)
    launched = "RANK" in os.environ  # under torchrun / accelerate launch: one of several processes
    if not args.resume and run.config_path.exists() and not launched:
        raise UsageError.at(
            run.root, "already holds a run; pass --resume auto to continue it, or choose another --run-dir"
        )
    if config.training.processes > 1 and not launched:
        return _launch_processes(config.training.processes, args, run.root)
    main_process = os.environ.get("RANK", "0") == "0"
    with log_to(run.log_path) if main_process else contextlib.nullcontext():
        try:
            adapter = Trainer(config, run, show_progress=not args.no_progress).run_training(args.resume)
        except StopRequested:
            print(
                f"stopped and saved; continue with: dora-studio train --run-dir {run.root} --resume auto",
                file=sys.stderr,
            )
            return EXIT_OK
    print(f"adapter: {adapter}\nsamples: {run.samples_dir}\nrun folder: {run.root}")
    return EXIT_OK


def _launch_processes(count: int, args: argparse.Namespace, run_dir: Path) -> int:
    """Run this same command as ``count`` processes under torchrun on this machine (one per GPU).

    torchrun forwards Ctrl-C/SIGTERM to every process and stops them all when one dies.
    """
    import subprocess

    argv = ["train", *([args.preset] if args.preset else []), "--run-dir", str(run_dir)]
    argv += [part for override in args.set for part in ("--set", override)]
    argv += (["--resume", args.resume] if args.resume else []) + (["--no-progress"] if args.no_progress else [])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={count}",
        "-m",
        "trainer.cli",
        *argv,
    ]
    return subprocess.call(command)


def cmd_estimate(args: argparse.Namespace) -> int:
    from trainer.config.presets import load_config
    from trainer.sdxl.configs import SDXL
    from trainer.training.estimate import GB, advice, device_memory, estimate_run, format_estimate

    config = load_config(args.preset, args.set)
    estimate = estimate_run(config, SDXL if args.architecture == "sdxl" else None)
    memory = int(args.device_memory * GB) if args.device_memory else device_memory()
    over = memory is not None and estimate.peak > memory
    tips = advice(estimate, config) if over or args.json else []
    if args.json:
        device = None if memory is None else round(memory / GB, 3)
        print(json.dumps(estimate.to_json() | {"device_memory_gb": device, "fits": not over, "advice": tips}, indent=2))
        return EXIT_OK
    print(format_estimate(estimate))
    print(f"\npeak {estimate.peak / GB:.2f} GB" + ("" if memory is None else f" of the device's {memory / GB:.1f} GB"))
    if over:
        print("warning: this run will not fit; what would bring it down:\n" + "\n".join(f"  {tip}" for tip in tips))
    return EXIT_OK


def cmd_settings(args: argparse.Namespace) -> int:
    from trainer.config.docs import settings_markdown, settings_text

    print(settings_markdown() if args.markdown else settings_text())
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from app.serve import serve

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            raise UsageError.at("--auth", "write it as USER:PASSWORD")
        auth = (user, password)
    serve(Path(args.runs_dir), host=args.host, port=args.port, auth=auth)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora-studio", description="Train and check LoRA/DoRA adapters for SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)

    add_adapter_file_commands(sub)

    p = sub.add_parser("make-tiny-model", help="write the built-in tiny SDXL-structured model (for tests, demos)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("make-toy-model", help="pretrain builtin:toy-sdxl from scratch (about 45 min on 2 CPU cores)")
    p.add_argument("--out", help="weights file to write (default: the packaged trainer/assets/toy-sdxl.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few steps of each stage: checks that the recipe runs (the model draws noise)",
    )
    p.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:1, mps, ...")
    p.set_defaults(func=cmd_make_toy_model)

    p = sub.add_parser("check-data", help="scan a dataset folder: repeats, captions, broken files, buckets, steps")
    p.add_argument(
        "dir",
        nargs="?",
        help="dataset folder: images with same-name captions, or subfolders like "
        "10_name (with --preset: overrides the preset's dataset.path)",
    )
    p.add_argument("--preset", help="take folder, caption extension, buckets and batch size from this preset")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--batch-size", type=int, default=1, help="for the steps-per-epoch count (default 1)")
    p.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="bucket resolution (default 1024; sides 512-2048, or down to the resolution when it is smaller)",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("train", help="train an adapter from a TOML preset; writes a run folder")
    p.add_argument("preset", nargs="?", help="preset .toml (see presets/); optional with --run-dir --resume")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set network.rank=8 (repeatable; see `dora-studio settings`)",
    )
    p.add_argument("--run-dir", help="run folder (default: RUNS_DIR/<output_name>-<date>-<time>)")
    p.add_argument("--runs-dir", default="runs", help="where new run folders go (default ./runs)")
    p.add_argument("--resume", metavar="auto|STATE", help="continue from the run's newest state, or this state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to train.log)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="the GPU memory a run needs, itemised, before it starts (no GPU needed)")
    p.add_argument("preset", help="preset .toml (see presets/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.add_argument(
        "--architecture",
        choices=("sdxl",),
        help="count SDXL from its own configs instead of reading the model's (ask before downloading it)",
    )
    p.add_argument("--device-memory", type=float, metavar="GB", help="compare with a card of this size (default: "
                   "this machine's GPU, if any)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the items, peak_gb and advice as JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("ui", help="the web studio: configure, start, watch and export runs in a browser")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine "
        "only; use 0.0.0.0 with --auth to reach it from elsewhere)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login for every page, file and API call")
    p.add_argument("--runs-dir", default="runs", help="where run folders live (default ./runs)")
    p.set_defaults(func=cmd_ui)

    add_import_kohya_command(sub)
    add_caption_command(sub)

    p = sub.add_parser("settings", help="list every preset setting with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library chatter (optional-backend notices, dtype advice meant for library authors) hides our own
    # messages; users who want it back can set these variables themselves.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except StudioError as error:  # what the user can fix: the problems, no traceback
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
