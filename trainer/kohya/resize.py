"""``dora-studio resize``: an adapter file at a lower rank, fixed or chosen per layer by kohya's dynamic rules.

Each layer's update is cut by ``adapters.low_rank`` to its best approximation at the new rank (Eckart-Young,
from the factors: nothing weight-sized is built, so SDXL's 722 layers take seconds). A DoRA layer keeps its
magnitudes as trained: only the direction's update is cut, so every column of the merged weight keeps the
norm it was trained to. What the cut cost is reported per layer: the update's relative error (exact, from the
singular values dropped) and, given the model, the merged weight's error against the original file's (the
``verify`` metric: largest difference over largest value), which for DoRA depends on the base weight.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from trainer.adapters.low_rank import (
    ZERO_UPDATE,
    DynamicMethod,
    UpdateSVD,
    dynamic_rank,
    truncate_rank,
    update_svd,
)
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.errors import UsageError
from trainer.files import file_sha256

from .adapter_file import LoadedAdapter, as_saved, factor_dtype, save_adapter
from .metadata import derived_metadata

RESIZE_KEY = "dora_studio.resize"  # what produced the file: source, its hash, the rule, the errors


@dataclass
class LayerResize:
    stem: str
    old_rank: int
    new_rank: int
    update_error: float  # ||cut|| / ||update||, Frobenius
    merged_error: float | None = None  # max |W'_new - W'_old| / max |W'_old|, with the model


@dataclass
class Resized:
    """A file's layers at their new ranks, what each cut cost, and the rule that chose the ranks."""

    adapters: dict[str, AdapterWeights]
    layers: list[LayerResize]
    rule: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Overall numbers for the report and the file's record."""
        cut = [layer for layer in self.layers if layer.new_rank < layer.old_rank]
        ranks = [layer.new_rank for layer in self.layers]
        merged = [layer.merged_error for layer in self.layers if layer.merged_error is not None]
        return {
            **self.rule,
            "layers": len(self.layers),
            "layers_cut": len(cut),
            "ranks": {"min": min(ranks), "max": max(ranks), "mean": round(statistics.fmean(ranks), 2)},
            "update_error_max": max((layer.update_error for layer in self.layers), default=0.0),
            "update_error_mean": statistics.fmean([layer.update_error for layer in self.layers]),
            "merged_error_max": max(merged) if merged else None,
        }


def resize_adapters(
    adapters: dict[str, AdapterWeights],
    rank: int,
    method: DynamicMethod | None = None,
    param: float | None = None,
    max_error: float | None = None,
    bases: dict[str, torch.Tensor] | None = None,
) -> Resized:
    """Every layer cut to ``rank``; with ``method``, to the rank kohya's rule picks; with ``max_error``, to the
    smallest rank whose merged weight is within it of the original's (verify's metric, on the layer's base weight
    in ``bases``). ``rank`` caps both. A layer already at or below its new rank is kept as it is; a zero update
    becomes rank 1, as in kohya."""
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if method and (param is None or param <= 0):
        raise UsageError(f"--dynamic {method} needs --dynamic-param above 0 (e.g. 0.9 for sv_fro), got {param}")
    if max_error is not None and (max_error <= 0 or method or bases is None):
        raise UsageError(
            "--max-error needs a value above 0 and --model (the merged weight needs the base), not --dynamic"
        )
    resized, layers = {}, []
    for stem, weights in adapters.items():
        svd = update_svd(weights)
        new_rank = min(rank, dynamic_rank(svd.values, method, param)) if method else rank
        if max_error is not None:
            new_rank = _smallest_rank_within(weights, svd, bases[stem], max_error, min(rank, weights.rank))
        if svd.values[0] <= ZERO_UPDATE:
            new_rank = 1
        resized[stem], error = truncate_rank(weights, min(new_rank, weights.rank), svd)
        layers.append(LayerResize(stem, weights.rank, resized[stem].rank, error))
    rule = {"rank": rank, **({"dynamic": method, "dynamic_param": param} if method else {})}
    return Resized(resized, layers, rule | ({"max_error": max_error} if max_error is not None else {}))


@torch.no_grad()
def _smallest_rank_within(
    weights: AdapterWeights, svd: UpdateSVD, base: torch.Tensor, max_error: float, cap: int
) -> int:
    """The smallest rank up to ``cap`` whose merged weight is within ``max_error`` of the layer's own (``cap`` when
    none is), by bisection: the error falls as the rank grows (Eckart-Young, for the update)."""
    original = merged_weight(base, weights)
    scale = original.abs().max().clamp_min(1e-30)

    def within(rank: int) -> bool:
        cut, _ = truncate_rank(weights, rank, svd)
        return float((merged_weight(base, cut) - original).abs().max() / scale) <= max_error

    low, high = 1, cap
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if within(middle) else (middle + 1, high)
    return low


def add_merged_errors(resized: Resized, errors: dict[str, float]) -> None:
    """Each layer's merged-weight error (``merge.merged_errors``), by stem."""
    for layer in resized.layers:
        layer.merged_error = errors.get(layer.stem)


def resized_metadata(loaded: LoadedAdapter, resized: Resized, source: Path) -> dict[str, str]:
    """The source's metadata, with kohya's dim / alpha / comment updated as its resize_lora.py does, and our record
    of the source (name and SHA-256 of the whole file) and of what the cut cost. A VeRA record is dropped: cut
    factors are no longer scaled rows of shared projections, so the result is a plain LoRA or DoRA file."""
    summary = resized.summary()
    metadata, dropped = derived_metadata(loaded.metadata)
    old_dim = metadata.get("ss_network_dim", str(max(layer.old_rank for layer in resized.layers)))
    gammas = {w.gamma for w in resized.adapters.values()}
    if "dynamic" in resized.rule or "max_error" in resized.rule:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
        rule = (
            f"{resized.rule['dynamic']}: {resized.rule['dynamic_param']}"
            if "dynamic" in resized.rule
            else (f"max_error: {resized.rule['max_error']}")
        )
        what = f"Dynamic resize with {rule} from {old_dim}"
    else:
        metadata["ss_network_dim"] = str(resized.rule["rank"])
        if len(gammas) == 1:
            metadata["ss_network_alpha"] = f"{gammas.pop() * resized.rule['rank']:g}"
        what = f"dimension is resized from {old_dim} to {resized.rule['rank']}"
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{what}; {comment}" if comment else what
    record = {"tool": "dora-studio resize", "source": source.name, "source_sha256": file_sha256(source), **summary}
    record |= dropped
    metadata[RESIZE_KEY] = json.dumps(record, sort_keys=True)
    return metadata


def save_resized(out: Path, loaded: LoadedAdapter, resized: Resized, source: Path) -> None:
    """Write the resized file atomically, in the dtype of the source's factors (fp16 if they are mixed)."""
    save_adapter(out, resized.adapters, resized_metadata(loaded, resized, source), factor_dtype(loaded))


def format_resize(resized: Resized, out: Path, worst: int = 5) -> str:
    summary = resized.summary()
    ranks = summary["ranks"]
    lines = [
        f"wrote {out}: {summary['layers_cut']} of {summary['layers']} layers cut; ranks {ranks['min']}-{ranks['max']} "
        f"(mean {ranks['mean']})",
        f"update error (||cut|| / ||update||): max {summary['update_error_max']:.2e}, "
        f"mean {summary['update_error_mean']:.2e}",
    ]
    if summary["merged_error_max"] is None:
        lines.append("merged-weight error: give --model to measure it (a DoRA layer's depends on the base weight)")
    else:
        lines.append(
            f"merged-weight error against the original file (verify's metric): max {summary['merged_error_max']:.2e}"
        )
    key = (
        (lambda layer: layer.merged_error)
        if summary["merged_error_max"] is not None
        else (lambda layer: layer.update_error)
    )
    lines.append("largest errors:")
    for layer in sorted(resized.layers, key=key, reverse=True)[:worst]:
        merged = "" if layer.merged_error is None else f", merged {layer.merged_error:.2e}"
        lines.append(
            f"  {layer.stem}: rank {layer.old_rank} -> {layer.new_rank}, update {layer.update_error:.2e}{merged}"
        )
    return "\n".join(lines)


def resize_json(resized: Resized, out: Path) -> dict:
    return {"out": str(out), **resized.summary(), "per_layer": [asdict(layer) for layer in resized.layers]}


def loaded_with(loaded: LoadedAdapter, resized: Resized) -> LoadedAdapter:
    """The loaded file with its layers replaced by the resized ones as the file will store them (to match them to
    a model and measure what a user gets)."""
    dtype = factor_dtype(loaded)
    return replace(loaded, adapters={stem: as_saved(w, dtype) for stem, w in resized.adapters.items()})
