"""``dora-studio caption``: caption a dataset folder with a tagger or captioner the user has on disk.

The images are the ones ``train`` and ``check-data`` find. Exit status 2 when any image could not be captioned
(each named with the fix), after every other image was.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from trainer.captioning.options import MODES
from trainer.errors import UsageError

from .common import EXIT_BAD_INPUT, EXIT_OK


def _tags(text: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in text.split(",") if tag.strip())


def _check_ranges(args: argparse.Namespace) -> None:
    fractions = {"--general-threshold": args.general_threshold, "--character-threshold": args.character_threshold}
    for flag, value in (fractions | {"--top-p": args.top_p}).items():
        if not 0 <= value <= 1:
            raise UsageError.at(f"{flag} {value}", "must be between 0 and 1")
    counts = {"--batch-size": args.batch_size, "--max-length": args.max_length, "--beams": args.beams}
    for flag, value in counts.items():
        if value < 1:
            raise UsageError.at(f"{flag} {value}", "must be 1 or more")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise UsageError.at(f"--device {args.device}", "write auto, cpu, mps, cuda or cuda:N (N: the GPU's number)")


def cmd_caption(args: argparse.Namespace) -> int:
    from trainer.captioning.options import CaptionerOptions, ModelSettings, TaggerOptions
    from trainer.captioning.run import CaptionPlan, caption_scan, format_caption_report
    from trainer.data.scan import scan_dataset

    _check_ranges(args)
    settings = ModelSettings(
        tagger=TaggerOptions(
            args.general_threshold, args.character_threshold, _tags(args.exclude_tags), args.underscores, args.rating
        ),
        captioner=CaptionerOptions(args.prompt, args.max_length, args.beams, args.sample, args.top_p),
        device=args.device,
        batch_size=args.batch_size,
    )
    plan = CaptionPlan(args.mode, args.trigger.strip(), _tags(args.always_tags), args.dry_run)
    scan = scan_dataset(Path(args.dir), args.caption_extension)
    report = caption_scan(scan, Path(args.model), settings, plan, show_progress=not args.no_progress)
    print(format_caption_report(report))
    return EXIT_BAD_INPUT if report.failed else EXIT_OK


def add_caption_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption", help="caption a dataset folder with a local WD14 tagger or transformers image-to-text model"
    )
    p.add_argument("dir", help="dataset folder, as for check-data (subfolders like 10_name included)")
    p.add_argument(
        "--model",
        required=True,
        help="model folder: a WD14-style tagger (model.onnx + selected_tags.csv) or a transformers "
        "image-to-text model (BLIP, GIT, Florence-2, ...)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="missing",
        help="missing: only images without a caption (default); overwrite: every image; append: add the new "
        "tags to existing captions",
    )
    p.add_argument("--dry-run", action="store_true", help="print each caption it would write; write nothing")
    p.add_argument("--trigger", default="", metavar="WORD", help="put this first in every caption")
    p.add_argument("--always-tags", default="", metavar="TAGS", help="comma-separated tags added to every caption")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one; default), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tagger = p.add_argument_group("tagger options (model.onnx)")
    tagger.add_argument(
        "--general-threshold", type=float, default=0.35, help="lowest score of a general tag (default 0.35)"
    )
    tagger.add_argument(
        "--character-threshold", type=float, default=0.85, help="lowest score of a character tag (default 0.85)"
    )
    tagger.add_argument("--exclude-tags", default="", metavar="TAGS", help="comma-separated tags never written")
    tagger.add_argument("--underscores", action="store_true", help="keep underscores (long_hair; default long hair)")
    tagger.add_argument("--rating", action="store_true", help="add the most likely rating tag (general, ...) first")
    captioner = p.add_argument_group("captioner options (transformers)")
    captioner.add_argument(
        "--prompt", default="", help='the caption\'s start ("a photography of") or task ("<CAPTION>" for Florence-2)'
    )
    captioner.add_argument("--max-length", type=int, default=75, help="most new tokens per caption (default 75)")
    captioner.add_argument("--beams", type=int, default=1, help="beam search width (default 1: greedy)")
    captioner.add_argument("--sample", action="store_true", help="sample words (nucleus, --top-p) instead")
    captioner.add_argument("--top-p", type=float, default=0.9, help="with --sample (default 0.9)")
    p.set_defaults(func=cmd_caption)
