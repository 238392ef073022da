"""``dora-studio convert``: a LoRA file as a DoRA file (exact) or a DoRA file as a LoRA file (at a rank you choose),
or a DoRA file on the other axis.

LoRA -> DoRA keeps the factors and sets each magnitude to the norm of the merged weight along the axis:
m = ||W + gamma up down||, so m V / ||V|| = V, the LoRA's own merged weight, at every strength (front ends blend
W + s (W' - W), the same for both). DoRA -> LoRA needs the whole merged change W' - W, which is weight-sized and
of full rank in general (the magnitudes rescale every column of W), so it is approximated at the new rank by SVD
(``adapters.low_rank.factor_change``: exact on small weights, randomized on SDXL's; the error measured either
way). DoRA on one axis -> the other keeps the merged weight as the target: its norms along the new axis are
the magnitudes, exactly, and its direction is found at the rank (``low_rank.dora_from_target``; exact when the
change is a LoRA's, e.g. a file that was converted from one). All need the base model: the magnitudes and the
merged change depend on W.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from trainer.adapters.dora_norm import DoraAxis, weight_norm
from trainer.adapters.low_rank import dora_from_target, factor_change
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.files import file_sha256

from .adapter_file import LoadedAdapter, as_saved
from .merge import StemMatch
from .metadata import derived_metadata, network_kind_keys

CONVERT_KEY = "dora_studio.convert"  # what produced the file: source, its hash, the direction, the errors


@dataclass
class LayerConversion:
    stem: str
    rank: int
    update_error: float  # ||approx - (W' - W)|| / ||W' - W||, Frobenius (0 for LoRA -> DoRA)
    merged_error: float = 0.0  # max |W'_new - W'_old| / max |W'_old|, verify's metric, on the file as written


@torch.no_grad()
def lora_to_dora(weights: AdapterWeights, base: Tensor, axis: DoraAxis) -> AdapterWeights:
    """The same factors, with the magnitude that makes the DoRA merge equal the LoRA's: ||V|| along ``axis``."""
    direction = base.float() + weights.gamma * weights.delta_weight(torch.float32)
    return replace(weights, dora_scale=weight_norm(direction, axis))


@torch.no_grad()
def dora_to_lora(weights: AdapterWeights, base: Tensor, rank: int) -> tuple[AdapterWeights, float]:
    """A LoRA of ``rank`` whose update best approximates the DoRA's merged change W' - W; alpha / rank as in the
    source, so the strength means the same; and the relative (Frobenius) error of that approximation."""
    converted, error = factor_change(base, merged_weight(base, weights), rank, weights.gamma)
    return replace(converted, down=converted.down.to(weights.down.dtype), up=converted.up.to(weights.up.dtype)), error


@torch.no_grad()
def convert_matched(
    match: StemMatch, to: str, axis: DoraAxis, rank: int | None, dtype: torch.dtype
) -> tuple[dict[str, AdapterWeights], list[LayerConversion]]:
    """Every matched layer converted on its model weight (``rank``: the new rank of a LoRA or of a DoRA moved to the
    other axis, default each layer's own), as the file will store it in ``dtype``, so that the errors measured on
    it are the file's."""
    adapters, layers = {}, []
    for stem, (weights, target) in match.matched.items():
        base = target.module.weight.detach()
        if to == "dora" and weights.is_dora:  # the other axis: the same merged weight, its norms along the new one
            converted, error = dora_from_target(base, merged_weight(base, weights), rank or weights.rank, axis)
        elif to == "dora":
            converted, error = lora_to_dora(weights, base, axis), 0.0
        else:
            converted, error = dora_to_lora(weights, base, rank or weights.rank)
        adapters[stem] = as_saved(converted, dtype)
        layers.append(LayerConversion(stem, converted.rank, error))
    return adapters, layers


def converted_metadata(
    loaded: LoadedAdapter, to: str, axis: DoraAxis | None, layers: Iterable[LayerConversion], source: Path
) -> dict[str, str]:
    """The source's metadata with the keys that say the kind rewritten, a VeRA record dropped, and our record."""
    metadata, dropped = derived_metadata(loaded.metadata)
    metadata.pop("dora_studio.dora_axis", None)
    try:
        network_args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        network_args = {}
    metadata |= network_kind_keys(axis if to == "dora" else None, network_args)
    layers = list(layers)
    record = {
        "tool": "dora-studio convert",
        "to": to,
        **({"dora_axis": axis} if to == "dora" else {"rank": max(layer.rank for layer in layers)}),
        "source": source.name,
        "source_sha256": file_sha256(source),
        "layers": len(layers),
        "update_error_max": max(layer.update_error for layer in layers),
        "merged_error_max": max(layer.merged_error for layer in layers),
        **dropped,
    }
    metadata[CONVERT_KEY] = json.dumps(record, sort_keys=True)
    return metadata


def format_conversion(layers: list[LayerConversion], to: str, axis: DoraAxis | None, out: Path, worst: int = 5) -> str:
    lines = [
        f"wrote {out}: {len(layers)} layers as {to.upper()}" + (f" ({axis} axis)" if axis else ""),
        f"merged-weight error against the source (verify's metric): max {max(x.merged_error for x in layers):.2e}",
    ]
    if to == "lora":
        lines.append(f"change approximated at the new rank: max error {max(x.update_error for x in layers):.2e}")
    lines.append("largest errors:")
    for layer in sorted(layers, key=lambda x: x.merged_error, reverse=True)[:worst]:
        lines.append(
            f"  {layer.stem}: rank {layer.rank}, merged {layer.merged_error:.2e}, change {layer.update_error:.2e}"
        )
    if axis == "output":
        lines.append(
            "warning: ComfyUI, Forge, AUTOMATIC1111 and InvokeAI do not merge output-axis DoRA files as trained "
            "(docs/adapter-format.md section 4); `dora-studio verify` shows by how much"
        )
    return "\n".join(lines)
