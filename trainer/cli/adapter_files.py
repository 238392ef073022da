"""Subcommands over adapter files: inspect, verify, merge, analyze, resize, convert, combine, extract.

Each imports what it uses when it runs, so ``--help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from trainer.errors import UsageError
from trainer.runs.run_directory import RunDirectory

from .common import CONFIG_HELP, EXIT_FAILED_CHECK, EXIT_OK, MODEL_HELP


def cmd_inspect(args: argparse.Namespace) -> int:
    from trainer.kohya.adapter_file import load_adapter
    from trainer.kohya.inspect import format_summary, summarize

    summary = summarize(load_adapter(Path(args.file)), args.file)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya.adapter_file import load_adapter
    from trainer.kohya.merge import match_pipeline
    from trainer.kohya.verify import format_distance, format_report, quantized_base_distance, verify_match
    from trainer.sdxl.model_files import load_sdxl_pipeline

    loaded = load_adapter(Path(args.file))  # before the slow model load, so a bad file fails fast
    match = match_pipeline(loaded, load_sdxl_pipeline(resolve_model_path(args.model), args.config_dir))
    report = verify_match(match, tolerance=args.tolerance, metadata=loaded.metadata)
    distance = quantized_base_distance(match, args.base_precision) if args.base_precision else None
    if args.json:
        print(json.dumps(report.to_json() | ({"quantized_base": asdict(distance)} if distance else {}), indent=2))
    else:
        print(format_report(report) + (f"\n\n{format_distance(distance)}" if distance else ""))
    return EXIT_OK if report.ok else EXIT_FAILED_CHECK


def cmd_merge(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya.adapter_file import load_adapter
    from trainer.kohya.merge import match_pipeline, merge_matched, require_full_match
    from trainer.sdxl.model_files import export_pipeline, load_sdxl_pipeline

    if Path(args.out).exists():
        raise UsageError.at(args.out, "already exists; choose a new output path so nothing is overwritten")
    loaded = load_adapter(Path(args.adapter))  # before the slow model load, so a bad file fails fast
    pipe = load_sdxl_pipeline(resolve_model_path(args.model), args.config_dir)
    match = match_pipeline(loaded, pipe)
    require_full_match(match, Path(args.adapter), args.model)
    merge_matched(match, args.strength)
    out = export_pipeline(pipe, Path(args.out))
    print(f"merged {len(match.matched)} layers at strength {args.strength:g} into {out}")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.config.presets import load_config
    from trainer.kohya import analyze
    from trainer.sdxl.model_files import load_sdxl_pipeline

    run = RunDirectory(Path(args.run or "."))
    if bool(args.file) == bool(args.run) or not (args.model if args.file else run.config_path.is_file()):
        raise UsageError("give an adapter FILE and --model MODEL, or --run RUN_DIR (a run folder: with a config.toml)")
    config = load_config(run.config_path) if args.run else None
    files = run.saved_adapters(config.saving.output_name) if config else [Path(args.file)]
    if not files:
        raise UsageError.at(run.adapters_dir, "holds no adapter yet; analyze the run once it has saved one")
    model, config_dir = (args.model, args.config_dir) if args.model else (config.model.path, config.model.config_dir)
    analyses = analyze.analyze_files(files, model, lambda: load_sdxl_pipeline(resolve_model_path(model), config_dir))
    if config is None:
        print(json.dumps(analyses[0].to_json(), indent=2) if args.json else analyze.format_analysis(analyses[0]))
        return EXIT_OK
    out = Path(args.out or run.analysis_dir)
    result = analyze.analyze_run(analyses, out)
    print(json.dumps(result, indent=2) if args.json else analyze.format_run(result, out))
    return EXIT_OK


def _fit_to_model(loaded, pipe, path: Path, model: str):
    """(the file with the model's stem names, its match to the model's modules); refused when a stem or shape does
    not fit (an adapter for another architecture)."""
    from trainer.kohya.merge import canonical_stems, match_pipeline, pipeline_parts, require_full_match

    loaded = canonical_stems(loaded, pipeline_parts(pipe))
    match = match_pipeline(loaded, pipe)
    require_full_match(match, path, model)
    return loaded, match


def _refuse_rank_above_layers(rank: int | None, weights: dict, where: str | Path) -> None:
    """A rank no layer's weight can hold (above min(out, in * kh * kw)) is refused, naming the smallest layer."""
    if rank is None or not weights:
        return
    sizes = {stem: min(weight.shape[0], weight[0].numel()) for stem, weight in weights.items()}
    smallest = min(sizes, key=sizes.get)
    if rank > sizes[smallest]:
        raise UsageError.at(where, f"rank {rank} is above what layer {smallest} can hold ({sizes[smallest]}, the "
                            f"smaller side of its weight); choose --rank {sizes[smallest]} or less")  # fmt: skip


def cmd_resize(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya import resize
    from trainer.kohya.adapter_file import load_adapter
    from trainer.kohya.merge import match_pipeline, merged_errors
    from trainer.sdxl.model_files import load_sdxl_pipeline

    source, out = Path(args.file), _new_output(args.out)
    loaded = load_adapter(source)  # before the slow model load, so a bad file fails fast
    pipe = load_sdxl_pipeline(resolve_model_path(args.model), args.config_dir) if args.model else None
    if pipe is not None:
        loaded, before = _fit_to_model(loaded, pipe, source, args.model)
    bases = {stem: target.module.weight.detach() for stem, (_, target) in before.matched.items()} if pipe else None
    resized = resize.resize_adapters(
        loaded.adapters, args.rank, args.dynamic, args.dynamic_param, args.max_error, bases
    )
    if not resized.summary()["layers_cut"]:
        ranks = sorted({w.rank for w in loaded.adapters.values()})
        raise UsageError.at(source, f"no layer gets a lower rank (the file's ranks: {ranks}); nothing was written")
    if pipe is not None:
        resize.add_merged_errors(
            resized, merged_errors(before, match_pipeline(resize.loaded_with(loaded, resized), pipe))
        )
    resize.save_resized(out, loaded, resized, source)
    print(json.dumps(resize.resize_json(resized, out), indent=2) if args.json else resize.format_resize(resized, out))
    return EXIT_OK


def _new_output(path: str) -> Path:
    """The path a tool writes its .safetensors file to, refused when it exists (nothing is overwritten)."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise UsageError.at(out, "the output must be a .safetensors file")
    if out.exists():
        raise UsageError.at(out, "already exists; choose a new output path so nothing is overwritten")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya import convert
    from trainer.kohya.adapter_file import factor_dtype, load_adapter, save_adapter
    from trainer.kohya.merge import match_pipeline, merged_errors
    from trainer.sdxl.model_files import load_sdxl_pipeline

    source, out = Path(args.file), _new_output(args.out)
    loaded = load_adapter(source)  # before the slow model load, so a bad file fails fast
    target = (lambda w: w.dora_axis == args.axis) if args.to == "dora" else (lambda w: not w.is_dora)
    if done := [stem for stem, w in loaded.adapters.items() if target(w)]:
        kind = f"DoRA on the {args.axis} axis" if args.to == "dora" else "LoRA"
        raise UsageError.at(source, f"{len(done)} layers are {kind} already (e.g. {done[0]}); nothing to convert")
    if args.rank is not None and (args.rank < 1 or not any(w.is_dora for w in loaded.adapters.values())):
        raise UsageError("--rank is at least 1, and for a DoRA file (LoRA -> DoRA keeps the factors: exact)")
    pipe = load_sdxl_pipeline(resolve_model_path(args.model), args.config_dir)
    loaded, before = _fit_to_model(loaded, pipe, source, args.model)
    dtype = factor_dtype(loaded)
    _refuse_rank_above_layers(args.rank, {s: t.module.weight for s, (_, t) in before.matched.items()}, source)
    adapters, layers = convert.convert_matched(before, args.to, args.axis, args.rank, dtype)
    errors = merged_errors(before, match_pipeline(replace(loaded, adapters=adapters), pipe))
    for layer in layers:
        layer.merged_error = errors[layer.stem]
    axis = args.axis if args.to == "dora" else None
    save_adapter(out, adapters, convert.converted_metadata(loaded, args.to, axis, layers, source), dtype)
    if args.json:
        print(json.dumps({"out": str(out), "per_layer": [asdict(layer) for layer in layers]}, indent=2))
    else:
        print(convert.format_conversion(layers, args.to, axis, out))
    return EXIT_OK


def cmd_combine(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya import combine
    from trainer.kohya.adapter_file import DTYPES, factor_dtype, load_adapter, save_adapter
    from trainer.sdxl.model_files import load_sdxl_pipeline

    out, sources = _new_output(args.out), [combine.parse_source(text) for text in args.files]
    if args.rank < 1:
        raise UsageError(f"--rank must be at least 1, got {args.rank}")
    for source in sources:  # every file read before the slow model load, so a bad one fails fast
        source.loaded = load_adapter(source.path)
    to = args.to or ("dora" if any(w.is_dora for s in sources for w in s.loaded.adapters.values()) else "lora")
    pipe = load_sdxl_pipeline(resolve_model_path(args.model), args.config_dir)
    for source in sources:
        source.loaded, source.match = _fit_to_model(source.loaded, pipe, source.path, args.model)
    dtypes = {factor_dtype(source.loaded) for source in sources}
    dtype = dtypes.pop() if len(dtypes) == 1 else DTYPES["fp16"]
    axis = args.axis if to == "dora" else None
    for source in sources:
        _refuse_rank_above_layers(
            args.rank, {s: t.module.weight for s, (_, t) in source.match.matched.items()}, source.path
        )
    adapters, layers = combine.combine_matched(sources, args.rank, axis, dtype)
    save_adapter(out, adapters, combine.combined_metadata(sources, args.rank, axis, layers), dtype)
    if args.json:
        print(json.dumps({"out": str(out), "per_layer": [asdict(layer) for layer in layers]}, indent=2))
    else:
        print(combine.format_combination(layers, axis, args.rank, out))
    return EXIT_OK


def cmd_extract(args: argparse.Namespace) -> int:
    from trainer.builtin.resolve import resolve_model_path
    from trainer.kohya import extract
    from trainer.kohya.adapter_file import DTYPES, save_adapter
    from trainer.kohya.merge import pipeline_parts
    from trainer.sdxl.model_files import load_sdxl_pipeline

    out = _new_output(args.out)
    if args.rank < 1:
        raise UsageError(f"--rank must be at least 1, got {args.rank}")
    base = pipeline_parts(load_sdxl_pipeline(resolve_model_path(args.base), args.base_config_dir))
    tuned = pipeline_parts(load_sdxl_pipeline(resolve_model_path(args.tuned), args.tuned_config_dir))
    parts = ("unet", "te1", "te2") if args.text_encoders else ("unet",)
    layers = extract.changed_layers({part: base[part] for part in parts}, tuned, args.unet_targets)
    if not layers:
        raise UsageError(f"{args.tuned} has the same weights as {args.base} in every target layer: nothing to extract")
    axis, dtype = (args.axis if args.kind == "dora" else None), DTYPES[args.precision]
    _refuse_rank_above_layers(args.rank, {stem: base for stem, (base, _) in layers.items()}, args.tuned)
    adapters, report = extract.extract_layers(layers, args.rank, axis, dtype)
    metadata = extract.extracted_metadata(args.base, args.tuned, args.rank, axis, args.unet_targets, report)
    save_adapter(out, adapters, metadata, dtype)
    if args.json:
        summary = extract.extraction_summary(report)
        print(json.dumps({"out": str(out), **summary, "per_layer": [asdict(x) for x in report]}, indent=2))
    else:
        print(extract.format_extraction(report, axis, args.rank, out))
    return EXIT_OK


def add_adapter_file_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise an adapter file (stems, ranks, kind, axis, metadata)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="merge a file as ComfyUI/Forge, A1111 and InvokeAI do; compare with ours")
    p.add_argument("file")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error accepted (default 1e-5)")
    p.add_argument(
        "--base-precision",
        choices=("fp8", "nf4"),
        help="the file was trained over this quantized base: also say how far the full-precision merge is from "
        "what training saw",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("merge", help="merge an adapter into a model; write a diffusers folder or .safetensors")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument("--adapter", required=True, help="adapter .safetensors file")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--out", required=True, help="output folder, or a .safetensors path for an SGM single file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("analyze", help="which layers an adapter changed, in magnitude or direction (DoRA paper)")
    p.add_argument("file", nargs="?", help="adapter .safetensors file (or --run)")
    p.add_argument("--run", metavar="RUN_DIR", help="every adapter the run saved, as checkpoints: plot ΔM against ΔD")
    p.add_argument("--model", help=MODEL_HELP + " (default with --run: the run's)")
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument("--out", metavar="DIR", help="with --run: where the PNG and JSON go (default RUN_DIR/analysis)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("resize", help="an adapter at a lower rank (fixed, or per layer by kohya's dynamic rules)")
    p.add_argument("file", help="adapter .safetensors file (kohya, LyCORIS, OneTrainer, PEFT or ours; LoRA or DoRA)")
    p.add_argument("--rank", type=int, required=True, help="the new rank; with --dynamic, the largest a layer gets")
    p.add_argument(
        "--dynamic",
        choices=("sv_ratio", "sv_fro", "sv_cumulative"),
        help="pick each layer's rank as kohya's resize_lora.py does: sv_fro keeps that fraction of the update's "
        "Frobenius norm, sv_cumulative of its singular values' sum; sv_ratio keeps those above largest / param",
    )
    p.add_argument("--dynamic-param", type=float, help="the rule's target, e.g. 0.9 (sv_fro), 0.95, or 10 (sv_ratio)")
    p.add_argument(
        "--max-error",
        type=float,
        help="instead of --dynamic: each layer's smallest rank whose merged weight is within this of the original "
        "(verify's metric, e.g. 0.01; needs --model)",
    )
    p.add_argument("--model", help=MODEL_HELP + "; measures each layer's merged-weight error and checks the fit")
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument("--out", required=True, help="the new .safetensors file (never overwrites)")
    p.add_argument("--json", action="store_true", help="print the summary and every layer's numbers as JSON")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("convert", help="LoRA as DoRA (exact), DoRA as LoRA or on the other axis (at a rank)")
    p.add_argument("file", help="adapter .safetensors file (kohya, LyCORIS, OneTrainer, PEFT or ours)")
    p.add_argument("--to", choices=("dora", "lora"), required=True)
    p.add_argument("--model", required=True, help=MODEL_HELP + "; DoRA's magnitudes depend on its weights")
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument(
        "--axis",
        choices=("input", "output"),
        default="input",
        help="--to dora: the magnitude's axis (default input: every SD front end merges it as trained)",
    )
    p.add_argument("--rank", type=int, help="from a DoRA file: the new rank (default: each layer's own)")
    p.add_argument("--out", required=True, help="the new .safetensors file (never overwrites)")
    p.add_argument("--json", action="store_true", help="print every layer's numbers as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("combine", help="several adapters folded into one LoRA or DoRA file, at one rank")
    p.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]", help="adapter files, each with a weight (default 1)")
    p.add_argument("--rank", type=int, required=True, help="the combined file's rank")
    p.add_argument("--model", required=True, help=MODEL_HELP + "; a DoRA's merged change depends on its weights")
    p.add_argument("--config-dir", help=CONFIG_HELP)
    p.add_argument("--to", choices=("dora", "lora"), help="the combined kind (default: DoRA if any file is, else LoRA)")
    p.add_argument("--axis", choices=("input", "output"), default="input", help="the DoRA axis (default input)")
    p.add_argument("--out", required=True, help="the new .safetensors file (never overwrites)")
    p.add_argument("--json", action="store_true", help="print every layer's numbers as JSON")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("extract", help="an adapter from a fine-tune's difference to its base model (LoRA or DoRA)")
    p.add_argument("--base", required=True, help=MODEL_HELP + " (the one the fine-tune started from)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model, in the same forms as --base")
    p.add_argument("--base-config-dir", help=CONFIG_HELP)
    p.add_argument("--tuned-config-dir", help=CONFIG_HELP)
    p.add_argument("--rank", type=int, required=True, help="the adapter's rank")
    p.add_argument(
        "--kind",
        choices=("lora", "dora"),
        default="lora",
        help="dora: the tuned weights' exact norms, only the direction approximated (default lora)",
    )
    p.add_argument("--axis", choices=("input", "output"), default="input", help="the DoRA axis (default input)")
    p.add_argument(
        "--unet-targets",
        choices=("attn", "attn+conv"),
        default="attn+conv",
        help="which UNet layers to compare (default attn+conv: every layer a fine-tune changes)",
    )
    p.add_argument("--text-encoders", action="store_true", help="also the text encoders' layers that changed")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="the file's dtype")
    p.add_argument("--out", required=True, help="the new .safetensors file (never overwrites)")
    p.add_argument("--json", action="store_true", help="print every layer's numbers as JSON")
    p.set_defaults(func=cmd_extract)
