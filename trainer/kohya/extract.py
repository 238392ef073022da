"""``dora-studio extract``: an adapter from the difference between a base model and a fine-tune of it.

Every adaptable layer of the UNet (attention, and convolutions with ``attn+conv``) and, on request, of the text
encoders is compared; a layer the fine-tune did not change is left out. A LoRA layer's update is the best
rank-R approximation of the change (``adapters.low_rank.factor_change``, as kohya's
``extract_lora_from_models.py`` does); a DoRA layer takes the tuned weight's exact norms as magnitudes and
approximates only the direction (``dora_from_target``), which reconstructs a fine-tune far better at the same
rank when the fine-tune rescaled channels. Both errors are reported per layer: the merged weight's against the
tuned weight, relative to the change (Frobenius), for the chosen kind and for a LoRA of the same rank.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.adapters.dora_norm import DoraAxis
from trainer.adapters.injection import target_module_paths
from trainer.adapters.low_rank import dora_from_target, factor_change
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.errors import UsageError
from trainer.sdxl.naming import Part, stem_for

from .adapter_file import as_saved
from .metadata import network_kind_keys

EXTRACT_KEY = "dora_studio.extract"  # the two models, the rank, the kind, the errors


@dataclass
class LayerExtraction:
    stem: str
    error: float  # ||W' - W_tuned|| / ||W_tuned - W_base||, the chosen kind, on the tensors as written
    lora_error: float  # the same for a LoRA of the same rank (equal to ``error`` when the kind is LoRA)


def changed_layers(
    base_parts: dict[Part, nn.Module], tuned_parts: dict[Part, nn.Module], unet_targets: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(base weight, tuned weight) by kohya stem, for every target layer whose weight differs; refuses models
    whose layers do not line up (not a fine-tune of this base)."""
    layers = {}
    for part, base in base_parts.items():
        tuned = dict(tuned_parts[part].named_modules())
        for path in target_module_paths(base, part, unet_targets):
            before, after = base.get_submodule(path).weight.detach(), tuned.get(path)
            if after is None or after.weight.shape != before.shape:
                raise UsageError(f"the tuned model's {part} has no layer {path} shaped {tuple(before.shape)}: "
                                 "is it a fine-tune of this base (same architecture)?")  # fmt: skip
            if not torch.equal(before, after.weight.detach()):
                layers[stem_for(part, path)] = (before, after.weight.detach())
    return layers


@torch.no_grad()
def extract_layers(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, axis: DoraAxis | None, dtype: torch.dtype
) -> tuple[dict[str, AdapterWeights], list[LayerExtraction]]:
    """Each changed layer as an adapter of ``rank`` (DoRA on ``axis``; LoRA when None), stored in ``dtype``."""
    adapters, report = {}, []
    for stem, (base, tuned) in layers.items():
        base, tuned = base.float(), tuned.float()
        change = (tuned - base).norm().clamp_min(1e-30)
        lora, _ = factor_change(base, tuned, rank, gamma=1.0)
        lora_error = float((merged_weight(base, as_saved(lora, dtype)) - tuned).norm() / change)
        if axis is None:
            adapters[stem], error = as_saved(lora, dtype), lora_error
        else:
            adapters[stem] = as_saved(dora_from_target(base, tuned, rank, axis)[0], dtype)
            error = float((merged_weight(base, adapters[stem]) - tuned).norm() / change)
        report.append(LayerExtraction(stem, error, lora_error))
    return adapters, report


def extracted_metadata(
    base: str, tuned: str, rank: int, axis: DoraAxis | None, unet_targets: str, report: list[LayerExtraction]
) -> dict[str, str]:
    metadata = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_sd_model_name": Path(base).name,
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}  # fmt: skip
    metadata |= network_kind_keys(axis) | {"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank))}
    metadata["ss_training_comment"] = f"extracted from {Path(tuned).name} against {Path(base).name}"
    summary = extraction_summary(report)
    record = {"tool": "dora-studio extract", "base": str(base), "tuned": str(tuned), "rank": rank,
              "kind": "dora" if axis else "lora", "unet_targets": unet_targets, **summary}  # fmt: skip
    metadata[EXTRACT_KEY] = json.dumps(record | ({"dora_axis": axis} if axis else {}), sort_keys=True)
    return metadata


def extraction_summary(report: list[LayerExtraction]) -> dict:
    return {
        "layers": len(report),
        "error_max": max(x.error for x in report),
        "error_mean": statistics.fmean(x.error for x in report),
        "lora_error_mean": statistics.fmean(x.lora_error for x in report),
    }


def format_extraction(report: list[LayerExtraction], axis: DoraAxis | None, rank: int, out: Path) -> str:
    summary = extraction_summary(report)
    kind = f"DoRA ({axis} axis)" if axis else "LoRA"
    lines = [
        f"wrote {out}: {summary['layers']} changed layers as a {kind} of rank {rank}",
        f"merged weight against the tuned one, relative to the change: mean {summary['error_mean']:.2e}, "
        f"max {summary['error_max']:.2e}",
    ]
    if axis:
        lines.append(f"a LoRA of the same rank: mean {summary['lora_error_mean']:.2e}")
    lines.append("largest errors:")
    for layer in sorted(report, key=lambda x: x.error, reverse=True)[:5]:
        lines.append(f"  {layer.stem}: {layer.error:.2e}" + (f" (LoRA {layer.lora_error:.2e})" if axis else ""))
    return "\n".join(lines)
