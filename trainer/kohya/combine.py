"""``dora-studio combine``: several adapter files folded into one LoRA or DoRA file at one rank.

Each layer's target is W + sum_i w_i (W'_i - W): every source's merged change at strength 1, weighted, on the
model's own weight (a DoRA source's change depends on W; a layer a source lacks adds nothing). The target is
factored again by SVD (``adapters.low_rank.factor_change``): for a LoRA the update is the best approximation
of the summed change at the rank; for a DoRA the magnitudes are the target's exact norms and only its
direction is approximated. kohya's ``svd_merge_lora.py`` does the LoRA half of this, for LoRA sources only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.dora_norm import DoraAxis
from trainer.adapters.low_rank import factor_change
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.files import file_sha256

from .adapter_file import LoadedAdapter, as_saved
from .merge import StemMatch, max_relative_error
from .metadata import network_kind_keys

COMBINE_KEY = "dora_studio.combine"  # the sources with their hashes and weights, the rank, the errors
KEPT_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
             "modelspec.implementation", "modelspec.prediction_type")  # fmt: skip


@dataclass
class Source:
    path: Path
    weight: float
    loaded: LoadedAdapter | None = None
    match: StemMatch | None = None


@dataclass
class LayerCombination:
    stem: str
    sources: int  # how many sources adapt this layer
    change_error: float  # ||approx - summed change|| / ||summed change||, Frobenius
    merged_error: float  # max |merged - target| / max |target|, verify's metric, on the tensors as written


def parse_source(text: str) -> Source:
    """FILE or FILE:WEIGHT; the weight is what follows the last colon when it is a number (a Windows drive's
    colon is part of the path)."""
    path, _, weight = text.rpartition(":")
    try:
        return Source(Path(path), float(weight)) if path else Source(Path(text), 1.0)
    except ValueError:
        return Source(Path(text), 1.0)


@torch.no_grad()
def combine_matched(
    sources: list[Source], rank: int, axis: DoraAxis | None, dtype: torch.dtype
) -> tuple[dict[str, AdapterWeights], list[LayerCombination]]:
    """Every layer any source adapts, as one adapter of ``rank`` (DoRA on ``axis``, or LoRA when None), stored in
    ``dtype``; and per layer how close the approximation is to the weighted sum."""
    stems = sorted({stem for source in sources for stem in source.match.matched})
    adapters, layers = {}, []
    for stem in stems:
        present = [(*source.match.matched[stem], source.weight) for source in sources if stem in source.match.matched]
        module = present[0][1].module  # every source's stem names this one module of the model
        base = module.weight.detach().float()
        target = base.clone()
        for weights, _, weight in present:
            target += weight * (merged_weight(base, weights) - base)
        factors, change_error = factor_change(base, target, rank, gamma=1.0, axis=axis)
        adapters[stem] = as_saved(factors, dtype)
        merged_error = max_relative_error(merged_weight(base, adapters[stem]), target)
        layers.append(LayerCombination(stem, len(present), change_error, merged_error))
    return adapters, layers


def combined_metadata(
    sources: list[Source], rank: int, axis: DoraAxis | None, layers: list[LayerCombination]
) -> dict[str, str]:
    """kohya's keys for the new kind and rank (alpha = rank: the factors carry the scale), the first source's
    architecture keys, and our record of every source (name, SHA-256 of the whole file, weight)."""
    first = sources[0].loaded.metadata
    metadata = {key: first[key] for key in KEPT_KEYS if key in first}
    metadata |= network_kind_keys(axis)
    metadata |= {"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank))}
    record = {
        "tool": "dora-studio combine",
        "to": "dora" if axis else "lora",
        **({"dora_axis": axis} if axis else {}),
        "rank": rank,
        "sources": [{"name": s.path.name, "sha256": file_sha256(s.path), "weight": s.weight} for s in sources],
        "layers": len(layers),
        "change_error_max": max(layer.change_error for layer in layers),
        "merged_error_max": max(layer.merged_error for layer in layers),
    }
    metadata[COMBINE_KEY] = json.dumps(record, sort_keys=True)
    return metadata


def format_combination(layers: list[LayerCombination], axis: DoraAxis | None, rank: int, out: Path) -> str:
    kind = f"DoRA ({axis} axis)" if axis else "LoRA"
    lines = [
        f"wrote {out}: {len(layers)} layers as one {kind} of rank {rank}",
        f"against the weighted sum: merged weight max {max(x.merged_error for x in layers):.2e} (verify's metric), "
        f"change max {max(x.change_error for x in layers):.2e} (Frobenius, relative)",
        "largest errors:",
    ]
    for layer in sorted(layers, key=lambda x: x.merged_error, reverse=True)[:5]:
        lines.append(
            f"  {layer.stem}: {layer.sources} sources, merged {layer.merged_error:.2e}, change {layer.change_error:.2e}"
        )
    return "\n".join(lines)
