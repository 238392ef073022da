"""``dora-studio verify``: how each SD front end will merge a file, against our exact merge.

Errors are max |front end - ours| / max |ours| per stem, the worst stem reported. An input-axis file
agrees everywhere to ~1e-7; an output-axis file does not, and the report says so: that is its purpose.
For a file trained over a quantized base (QLoRA, QDoRA), ``quantized_base_distance`` says how far the weight
front ends merge onto the full-precision checkpoint is from the one training saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trainer.adapters.quantized import QuantizedWeight
from trainer.adapters.weights import merged_weight

from .frontend_merge import FRONT_ENDS
from .merge import StemMatch
from .metadata import EXPORT_RANK_KEY

DEFAULT_STRENGTHS = (1.0, 0.5)
DEFAULT_TOLERANCE = 1e-5


@dataclass
class FrontEndResult:
    front_end: str
    strength: float
    max_rel_error: float
    worst_stem: str | None


@dataclass
class VerifyReport:
    results: list[FrontEndResult]
    unmatched_stems: list[str]
    misfit_stems: dict[str, str]
    stems_checked: int
    tolerance: float
    failures: list[str] = field(default_factory=list)
    export_cut: dict | None = None  # the file's dora_studio.export_rank record: saved below its trained rank

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "stems_checked": self.stems_checked,
            "results": [r.__dict__ for r in self.results],
            "unmatched_stems": self.unmatched_stems,
            "misfit_stems": self.misfit_stems,
            "failures": self.failures,
            "export_cut": self.export_cut,
        }


def verify_match(
    match: StemMatch,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    tolerance: float = DEFAULT_TOLERANCE,
    front_ends: Mapping[str, object] = FRONT_ENDS,
    metadata: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Merge every matched stem with our code and each front end's formula; collect the worst errors. With the
    file's ``metadata``, also report what a cut to a lower rank at save time cost (``saving.export_rank``)."""
    worst = {(name, s): (0.0, None) for name in front_ends for s in strengths}
    for stem, (weights, target) in match.matched.items():
        base = target.module.weight.detach()
        for strength in strengths:
            ours = merged_weight(base, weights, strength)
            scale = ours.abs().max().clamp_min(1e-30)
            for name, merge in front_ends.items():
                error = ((merge(base, weights, strength) - ours).abs().max() / scale).item()
                if error > worst[(name, strength)][0] or worst[(name, strength)][1] is None:
                    worst[(name, strength)] = (error, stem)
    results = [FrontEndResult(name, s, err, stem) for (name, s), (err, stem) in worst.items()]
    report = VerifyReport(results, match.unmatched, match.misfit, len(match.matched), tolerance)
    if metadata and EXPORT_RANK_KEY in metadata:
        report.export_cut = json.loads(metadata[EXPORT_RANK_KEY])
    for r in results:
        if r.max_rel_error > tolerance:
            report.failures.append(
                f"{r.front_end} at strength {r.strength}: max relative error {r.max_rel_error:.2e} "
                f"(worst stem {r.worst_stem})"
            )
    if match.unmatched:
        report.failures.append(f"{len(match.unmatched)} stems match no module of the model; front ends drop them")
    if match.misfit:
        report.failures.append(f"{len(match.misfit)} stems have shapes that do not fit their module")
    if not match.matched:
        report.failures.append("no stem of the file matches the model")
    return report


@dataclass
class QuantizedBaseDistance:
    """Merged on the full-precision weights (front ends) against merged on the dequantized ones (training).

    Relative Frobenius errors per stem, summarised; ``base_error`` is the quantization's own, for scale.
    """

    precision: str
    mean_rel_error: float
    max_rel_error: float
    worst_stem: str | None
    base_error: float


def quantized_base_distance(match: StemMatch, precision: str) -> QuantizedBaseDistance:
    errors, base_errors = {}, []
    for stem, (weights, target) in match.matched.items():
        full = target.module.weight.detach().float()
        dequantized = QuantizedWeight(full, precision).dequantize()
        front_ends = merged_weight(full, weights)
        training = merged_weight(dequantized, weights)
        errors[stem] = ((front_ends - training).norm() / training.norm().clamp_min(1e-30)).item()
        base_errors.append(((full - dequantized).norm() / full.norm().clamp_min(1e-30)).item())
    worst = max(errors, key=errors.get, default=None)
    mean = sum(errors.values()) / max(len(errors), 1)
    base = sum(base_errors) / max(len(base_errors), 1)
    return QuantizedBaseDistance(precision, mean, errors.get(worst, 0.0), worst, base)


def format_distance(distance: QuantizedBaseDistance) -> str:
    return (
        f"trained over a {distance.precision} base: merged onto the full-precision weights, each layer differs from "
        f"what training saw by {distance.mean_rel_error:.2e} on average, {distance.max_rel_error:.2e} at most "
        f"({distance.worst_stem}); the {distance.precision} weights themselves differ from the full-precision ones "
        f"by {distance.base_error:.2e} (relative Frobenius norms)"
    )


def format_report(report: VerifyReport) -> str:
    lines = [f"checked {report.stems_checked} stems; tolerance {report.tolerance:g}", ""]
    lines.append(f"{'front end':<14}{'strength':>9}{'max rel error':>16}  worst stem")
    for r in report.results:
        flag = "" if r.max_rel_error <= report.tolerance else "  <- differs"
        lines.append(f"{r.front_end:<14}{r.strength:>9g}{r.max_rel_error:>16.2e}  {r.worst_stem}{flag}")
    if report.unmatched_stems:
        lines += ["", f"stems with no matching module ({len(report.unmatched_stems)}):"]
        lines += [f"  {s}" for s in report.unmatched_stems[:20]]
    if report.misfit_stems:
        lines += ["", "stems whose shapes do not fit:"] + [f"  {s}: {w}" for s, w in report.misfit_stems.items()]
    if cut := report.export_cut:
        lines += [
            "",
            f"saved at rank {cut['rank']} from the trained rank {cut['trained_rank']} by SVD: front ends merge the "
            f"cut update, {cut['update_error_mean']:.1%} from the trained one on average, "
            f"{cut['update_error_max']:.1%} at most (relative to each layer's update)",
        ]
    lines += ["", "OK: every front end merges this file to our weights" if report.ok else "FAILED:"]
    lines += [f"  {f}" for f in report.failures]
    return "\n".join(lines)
