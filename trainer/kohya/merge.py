"""Match an adapter file's stems to a model's modules and merge it in (``sdxl.model_files`` saves the result).

The merge is ``trainer.adapters.weights.merged_weight``: the same arithmetic the layers use, so a merged
model computes what the adapter computed in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.errors import AdapterMismatchError, Problem
from trainer.sdxl.naming import Part, stem_for, unet_diffusers_stem_aliases

from .adapter_file import LoadedAdapter, rename_stems


@dataclass(frozen=True)
class StemTarget:
    """The module a stem names in a loaded model."""

    part: Part
    path: str
    module: nn.Linear | nn.Conv2d


def model_stem_targets(parts: Mapping[Part, nn.Module]) -> dict[str, StemTarget]:
    """Every Linear and Conv2d of the given models by kohya stem (not only the default targets)."""
    targets: dict[str, StemTarget] = {}
    for part, model in parts.items():
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                try:
                    targets[stem_for(part, path)] = StemTarget(part, path, module)
                except ValueError:
                    continue  # a module with no SGM name cannot appear in a kohya file
    return targets


def pipeline_parts(pipe) -> dict[Part, nn.Module]:
    return {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}


def canonical_stems(loaded: LoadedAdapter, parts: Mapping[Part, nn.Module]) -> LoadedAdapter:
    """Rename diffusers-underscore UNet stems (written by some trainers) to the SGM stems we use."""
    aliases = unet_diffusers_stem_aliases(path for path, _ in parts["unet"].named_modules()) if "unet" in parts else {}
    return rename_stems(loaded, aliases)


def _shape_problem(weights: AdapterWeights, module: nn.Module) -> str | None:
    weight_shape = tuple(module.weight.shape)
    expected = (weight_shape[0], *weights.down.shape[1:])
    if expected != weight_shape or weights.up.shape[0] != weight_shape[0]:
        return f"adapter {tuple(weights.up.shape)} x {tuple(weights.down.shape)} does not fit weight {weight_shape}"
    return None


@dataclass
class StemMatch:
    matched: dict[str, tuple[AdapterWeights, StemTarget]]
    unmatched: list[str]  # stems no module of the model has
    misfit: dict[str, str]  # stems whose shapes do not fit their module, with why


def match_stems(adapters: Mapping[str, AdapterWeights], targets: Mapping[str, StemTarget]) -> StemMatch:
    result = StemMatch({}, [], {})
    for stem, weights in sorted(adapters.items()):
        target = targets.get(stem)
        if target is None:
            result.unmatched.append(stem)
        elif problem := _shape_problem(weights, target.module):
            result.misfit[stem] = problem
        else:
            result.matched[stem] = (weights, target)
    return result


def match_pipeline(loaded: LoadedAdapter, pipe) -> StemMatch:
    """The file's stems against every Linear/Conv2d of an SDXL pipeline (diffusers-underscore stems renamed)."""
    parts = pipeline_parts(pipe)
    return match_stems(canonical_stems(loaded, parts).adapters, model_stem_targets(parts))


def require_full_match(match: StemMatch, adapter_file: Path, model: str | Path) -> None:
    """Refuse to merge a file whose stems the model does not have: front ends would drop them silently."""
    if not match.unmatched and not match.misfit:
        return
    problems = [Problem(stem, "no such module") for stem in match.unmatched[:10]]
    problems += [Problem(stem, why) for stem, why in list(match.misfit.items())[:10]]
    more = len(match.unmatched) + len(match.misfit) - len(problems)
    raise AdapterMismatchError(
        *problems,
        *([f"... and {more} more"] if more > 0 else []),
        context=f"{adapter_file} does not fit the model {model}: {len(match.unmatched)} stems not found, "
        f"{len(match.misfit)} with wrong shapes (is it an adapter for another architecture, e.g. SD1.5?)",
    )


@torch.no_grad()
def merge_matched(match: StemMatch, strength: float) -> None:
    """Write W + s * (W' - W) into every matched module, in its own dtype."""
    for weights, target in match.matched.values():
        weight = target.module.weight
        weight.copy_(merged_weight(weight, weights, strength).to(weight.dtype))


@torch.no_grad()
def merged_errors(before: StemMatch, after: StemMatch) -> dict[str, float]:
    """Per stem, the merged weight (strength 1) of ``after``'s adapter against ``before``'s on the model's own base
    weight, as ``verify`` measures: the largest difference over the largest value. For the tools that rewrite
    a file (resize, convert), whose DoRA layers' merged weights depend on the base."""
    errors = {}
    for stem, (weights, target) in after.matched.items():
        base = target.module.weight.detach()
        errors[stem] = max_relative_error(merged_weight(base, weights), merged_weight(base, before.matched[stem][0]))
    return errors


def max_relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``verify``'s metric: the largest difference from ``reference`` over its largest value."""
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
