"""``dora-studio inspect``: what an adapter file holds, per part, without a model."""

from __future__ import annotations

from collections import Counter

from trainer.sdxl.naming import parse_stem_part

from .adapter_file import LoadedAdapter
from .metadata import THUMBNAIL_KEY, describe_thumbnail
from .vera_file import read_vera_file

# The metadata a user asks about first; the rest is in --json.
KEY_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_output_name",
    "ss_sd_model_name",
    "ss_steps",
    "ss_epoch",
    "ss_mixed_precision",
    "ss_training_finished_at",
    "modelspec.architecture",
    "modelspec.title",
    "dora_studio.dora_axis",
    "dora_studio.vera",
    "dora_studio.export_rank",
    "dora_studio.ema",
    "sshs_model_hash",
)


def summarize(loaded: LoadedAdapter, source: str = "the file") -> dict:
    """Counts, ranks, alphas, kinds and axes per part (unet / te1 / te2), file dtypes, key metadata, what its
    thumbnail is (described, not its base64), and for a VeRA / DVoRA file its record, checked
    (``kohya.vera_file``; refused, naming ``source``, when it fails)."""
    vera = read_vera_file(loaded, source)
    parts: dict[str, dict] = {}
    for stem, weights in loaded.adapters.items():
        try:
            part = parse_stem_part(stem)
        except ValueError:
            part = "other"
        entry = parts.setdefault(part, {"stems": 0, "ranks": Counter(), "alphas": Counter(), "kinds": Counter()})
        entry["stems"] += 1
        entry["ranks"][weights.rank] += 1
        entry["alphas"][weights.alpha] += 1
        entry["kinds"][f"dora-{weights.dora_axis}" if weights.is_dora else "lora"] += 1
    return {
        "stems": len(loaded.adapters),
        "parts": {p: {k: (dict(v) if isinstance(v, Counter) else v) for k, v in e.items()} for p, e in parts.items()},
        "dtypes": dict(Counter(loaded.dtypes.values())),
        "metadata": {k: loaded.metadata[k] for k in KEY_METADATA if k in loaded.metadata},
        "unknown_keys": loaded.unknown_keys,
        "vera": vera.summary() if vera else None,
        "thumbnail": describe_thumbnail(loaded.metadata[THUMBNAIL_KEY]) if THUMBNAIL_KEY in loaded.metadata else None,
    }


def format_summary(summary: dict) -> str:
    def counts(counter: dict) -> str:
        return ", ".join(f"{k} ({n})" for k, n in sorted(counter.items(), key=lambda kv: str(kv[0])))

    lines = [f"{summary['stems']} adapted layers"]
    for part, entry in summary["parts"].items():
        lines.append(
            f"  {part:<5} {entry['stems']:>4} stems; kind {counts(entry['kinds'])}; rank {counts(entry['ranks'])}; "
            f"alpha {counts(entry['alphas'])}"
        )
    lines.append(f"tensor dtypes: {counts(summary['dtypes'])}")
    if summary["thumbnail"]:
        lines.append(f"thumbnail: {summary['thumbnail']}")
    if vera := summary["vera"]:
        parts = "; ".join(
            f"{part} seed {p['seed']}, rank {p['rank']}, {p['in_features']} in, {p['out_features']} out"
            for part, p in vera["projections"].items()
        )
        lines.append(f"{vera['kind']} projections ({parts}): rebuilt from the file's record, digests match")
        lines.append(f"  every stem's factors are scaled rows of them ({vera['stems_checked']} stems checked)")
    if summary["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in summary["metadata"].items()]
    if summary["unknown_keys"]:
        lines.append(f"unknown keys (not read) ({len(summary['unknown_keys'])}):")
        lines += [f"  {k}" for k in summary["unknown_keys"][:30]]
    return "\n".join(lines)
