"""``dora-studio analyze``: which layers an adapter changed, in magnitude or in direction.

Each stem's merged weight is compared with the base weight by the DoRA paper's decomposition
(``trainer.adapters.decomposition``), on both axes: the one the file's DoRA normalises (the input axis for a
LoRA file, kohya's and LyCORIS's convention) and the other. Stems are grouped by layer type and by block,
named from the kohya stem alone, so an artist can see where an adapter acts. Over the adapters a run saved
(``analyze_run``), ΔM against ΔD per layer type is the paper's figure 2: its slope tells how the method learned.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from trainer.adapters.decomposition import decomposition_change, slope_and_correlation
from trainer.adapters.dora_norm import DORA_AXES, DoraAxis
from trainer.adapters.weights import merged_weight
from trainer.files import write_bytes_atomically
from trainer.sdxl.naming import Part, unet_sgm_to_diffusers

from .adapter_file import load_adapter
from .merge import StemMatch, match_pipeline, require_full_match

PLOT_FILE, RESULT_FILE = "decomposition.png", "decomposition.json"  # what ``--run`` writes into its folder
LAYER_TYPES = ("q", "k", "v", "out", "ff", "proj", "conv", "other")
# How a stem ends (UNet in SGM layout, CLIP in HF layout) says what the layer is; the first match wins.
_TYPE_PATTERNS = (
    ("q", re.compile(r"_(to_q|q_proj)$")),
    ("k", re.compile(r"_(to_k|k_proj)$")),
    ("v", re.compile(r"_(to_v|v_proj)$")),
    ("out", re.compile(r"_(to_out_0|out_proj)$")),
    ("ff", re.compile(r"_(ff_net_0_proj|ff_net_2|mlp_fc1|mlp_fc2)$")),
    ("proj", re.compile(r"_(proj_in|proj_out)$")),
    # resnet convs and shortcut, down/up samplers, conv_in, conv_out
    ("conv", re.compile(r"_(in_layers_2|out_layers_3|skip_connection|op|conv)$|^lora_unet_(input_blocks_0_0|out_2)$")),
)
_UNET_BLOCK = re.compile(r"^lora_unet_(?P<side>input_blocks|output_blocks)_(?P<n>\d+)_(?P<slot>\d+)")
_TEXT_LAYER = re.compile(r"_encoder_layers_(?P<i>\d+)_")
TEXT_LAYERS_PER_BLOCK = 4  # CLIP's 12 and 32 layers, in blocks an eye can take in
PLOT_COLUMNS, MAX_LEGEND = 4, 8  # layer types side by side; checkpoints named in the legend (else first, last)


def layer_type(stem: str) -> str:
    """One of ``LAYER_TYPES``, read from how the stem ends."""
    return next((name for name, pattern in _TYPE_PATTERNS if pattern.search(stem)), "other")


def attention_kind(stem: str) -> str | None:
    """Self-attention within one sequence (UNet attn1, CLIP self_attn) or cross-attention of the image to the text
    (UNet attn2): "self", "cross", or None for a layer outside attention."""
    if "_attn2_" in stem:
        return "cross"
    return "self" if "_attn1_" in stem or "_self_attn_" in stem else None


def block_name(stem: str, part: Part) -> str:
    """UNet: the diffusers block ("unet down_blocks.1", "unet mid_block"); CLIP: a run of 4 layers."""
    if part != "unet":
        match = _TEXT_LAYER.search(stem)
        if not match:
            return f"{part} outside layers"
        first = int(match["i"]) // TEXT_LAYERS_PER_BLOCK * TEXT_LAYERS_PER_BLOCK
        return f"{part} layers {first}-{first + TEXT_LAYERS_PER_BLOCK - 1}"
    if stem.startswith("lora_unet_middle_block_"):
        return "unet mid_block"
    match = _UNET_BLOCK.match(stem)
    try:
        path = unet_sgm_to_diffusers(f"{match['side']}.{match['n']}.{match['slot']}") if match else ""
    except ValueError:
        path = ""
    if path.startswith(("down_blocks.", "up_blocks.")):
        return "unet " + ".".join(path.split(".")[:2])
    return "unet outside blocks"  # conv_in, conv_out, the time and label embeddings


Change = dict[DoraAxis, tuple[float, float]]  # axis -> (ΔM, ΔD)


@dataclass(frozen=True)
class LayerChange:
    """One adapted layer: what it is, where it sits, how far its merged weight moved."""

    stem: str
    part: Part
    layer_type: str
    attention: str | None
    block: str
    change: Change


@dataclass(frozen=True)
class GroupChange:
    """Mean ΔM and ΔD of the layers of one type or one block."""

    name: str
    layers: int
    change: Change


def _mean_changes(name: str, layers: list[LayerChange]) -> GroupChange:
    change = {
        axis: (fmean(layer.change[axis][0] for layer in layers), fmean(layer.change[axis][1] for layer in layers))
        for axis in DORA_AXES
    }
    return GroupChange(name, len(layers), change)


def _change_json(change: Change) -> dict:
    return {axis: {"dM": magnitude, "dD": direction} for axis, (magnitude, direction) in change.items()}


@dataclass(frozen=True)
class AdapterChange:
    """How far one adapter file moves each layer of the model it was merged into."""

    file: str
    kind: str  # "DoRA", "LoRA", or "LoRA and DoRA"
    axis: DoraAxis  # the file's DoRA axis; "input" for LoRA (kohya's and LyCORIS's convention)
    layers: list[LayerChange]

    def by_type(self) -> list[GroupChange]:
        """In ``LAYER_TYPES`` order."""
        return [
            _mean_changes(kind, found)
            for kind in LAYER_TYPES
            if (found := [layer for layer in self.layers if layer.layer_type == kind])
        ]

    def by_block(self) -> list[GroupChange]:
        """Most changed direction first (on the file's axis): ΔD has no unit, so blocks compare fairly."""
        blocks: dict[str, list[LayerChange]] = {}
        for layer in self.layers:
            blocks.setdefault(layer.block, []).append(layer)
        groups = [_mean_changes(name, layers) for name, layers in blocks.items()]
        return sorted(groups, key=lambda group: -group.change[self.axis][1])

    def to_json(self, with_layers: bool = True) -> dict:
        groups = {"by_type": self.by_type(), "by_block": self.by_block()}
        result = {"file": self.file, "kind": self.kind, "axis": self.axis, "stems": len(self.layers)}
        result |= {
            key: [{"name": g.name, "layers": g.layers, **_change_json(g.change)} for g in found]
            for key, found in groups.items()
        }
        if with_layers:
            result["layers"] = [
                {"stem": layer.stem, "part": layer.part, "type": layer.layer_type, "attention": layer.attention}
                | {"block": layer.block, **_change_json(layer.change)}
                for layer in self.layers
            ]
        return result


def analyze_match(file: str, match: StemMatch) -> AdapterChange:
    """(ΔM, ΔD) of every matched stem's merged weight against its base weight, on both axes."""
    layers = []
    for stem, (weights, target) in match.matched.items():
        base = target.module.weight.detach()
        tuned = merged_weight(base, weights)
        change = {axis: decomposition_change(base, tuned, axis) for axis in DORA_AXES}
        part = target.part
        layers.append(LayerChange(stem, part, layer_type(stem), attention_kind(stem), block_name(stem, part), change))
    axes = Counter(weights.dora_axis for weights, _ in match.matched.values() if weights.is_dora)
    dora = sum(axes.values())
    kind = "LoRA" if not dora else "DoRA" if dora == len(match.matched) else "LoRA and DoRA"
    return AdapterChange(file, kind, axes.most_common(1)[0][0] if axes else "input", layers)


def analyze_files(files: Sequence[Path], model: str, load_pipeline: Callable[[], object]) -> list[AdapterChange]:
    """Each file merged into the pipeline ``load_pipeline`` gives; ``AdapterMismatchError`` naming the stems
    of a file the model does not fit (another architecture, missing modules, other shapes)."""
    first = load_adapter(files[0])  # before the slow model load, so a bad file fails fast
    pipe = load_pipeline()
    analyses = []
    for index, path in enumerate(files):
        match = match_pipeline(load_adapter(path) if index else first, pipe)
        require_full_match(match, path, model)
        analyses.append(analyze_match(path.name, match))
    return analyses


def _other(axis: DoraAxis) -> DoraAxis:
    return "output" if axis == "input" else "input"


def _format_groups(title: str, groups: list[GroupChange], axis: DoraAxis) -> list[str]:
    other = _other(axis)
    own = f"{axis} axis (the file's)"
    lines = [f"{'':<40}{own:>24}{other + ' axis':>24}"]
    lines.append(f"{title:<33}{'layers':>7}" + f"{'ΔM':>12}{'ΔD':>12}" * 2)
    for g in groups:
        values = (*g.change[axis], *g.change[other])
        lines.append(f"  {g.name:<31}{g.layers:>7}" + "".join(f"{value:>12.3e}" for value in values))
    return lines


def format_analysis(analysis: AdapterChange) -> str:
    """The text report: where the adapter acts, most changed blocks first."""
    axis, blocks = analysis.axis, analysis.by_block()
    top_magnitude = max(blocks, key=lambda g: g.change[axis][0])
    if analysis.kind == "LoRA":
        kind = "LoRA; measured on the input axis (kohya's and LyCORIS's DoRA axis) and on the output axis"
    else:
        kind = f"{analysis.kind} on the {axis} axis; measured on it and on the {_other(axis)} axis"
    lines = [
        f"{analysis.file}: {len(analysis.layers)} layers, {kind}",
        "ΔM = mean |‖W'_j‖ − ‖W0_j‖| and ΔD = mean (1 − cos(W'_j, W0_j)) over the vectors j of each merged weight",
        "W' and the base W0: one per input channel (input axis) or one per output feature (output axis)",
        "",
        f"most changed in direction: {blocks[0].name} (ΔD {blocks[0].change[axis][1]:.3e}); "
        f"in magnitude: {top_magnitude.name} (ΔM {top_magnitude.change[axis][0]:.3e})",
        "",
        *_format_groups("by block, most turned first", blocks, axis),
        "",
        *_format_groups("by layer type", analysis.by_type(), axis),
    ]
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def run_result(analyses: Sequence[AdapterChange]) -> dict:
    """Figure 2 of the paper per layer type: (ΔD, ΔM) over layers x checkpoints, the least-squares slope and
    Pearson's r, per axis; with the last checkpoint's summary. JSON-ready."""
    by_type = {}
    for kind in LAYER_TYPES:
        found = [
            (i, layer) for i, analysis in enumerate(analyses) for layer in analysis.layers if layer.layer_type == kind
        ]
        if not found:
            continue
        by_type[kind] = {}
        for axis in DORA_AXES:
            points = [[i, layer.change[axis][1], layer.change[axis][0]] for i, layer in found]  # checkpoint, ΔD, ΔM
            slope, r = slope_and_correlation([p[1] for p in points], [p[2] for p in points])
            by_type[kind][axis] = {"slope": _finite(slope), "r": _finite(r), "points": points}
    last = analyses[-1]
    return {
        "checkpoints": [analysis.file for analysis in analyses],
        "kind": last.kind,
        "axis": last.axis,
        "by_type": by_type,
        "last": last.to_json(with_layers=False),
        "plot": PLOT_FILE,
    }


def _fit_words(fit: dict) -> str:
    if fit["slope"] is None:
        return f"{'-':>10}{'-':>7}"
    return f"{fit['slope']:>10.3g}{fit['r']:>+7.2f}"


def format_run(result: dict, out_dir: Path) -> str:
    axis = result["axis"]
    other = _other(axis)
    lines = [
        f"{len(result['checkpoints'])} checkpoints ({result['kind']}, {axis} axis): {', '.join(result['checkpoints'])}",
        "ΔM against ΔD over layers and checkpoints, per layer type (the DoRA paper's figure 2 finds",
        "a negative slope for DoRA and full fine-tuning, a positive one for LoRA):",
        f"{'type':<8}{'points':>7}   {axis + ' axis: slope':>19}{'r':>7}   {other + ' axis: slope':>20}{'r':>7}",
    ]
    for kind, fits in result["by_type"].items():
        lines.append(
            f"{kind:<8}{len(fits[axis]['points']):>7}   {_fit_words(fits[axis]):>26}   {_fit_words(fits[other]):>27}"
        )
    last = result["last"]
    lines += ["", f"last checkpoint, {last['file']}, by block (most turned first):"]
    lines += [
        f"  {block['name']:<32}ΔM {block[axis]['dM']:.3e}  ΔD {block[axis]['dD']:.3e}" for block in last["by_block"]
    ]
    lines += ["", f"wrote {Path(out_dir) / PLOT_FILE} and {RESULT_FILE} beside it"]
    return "\n".join(lines)


def plot_run(result: dict) -> bytes:
    """The PNG: per layer type a panel on each axis, points coloured by checkpoint, with the fitted line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kinds, axes, checkpoints = list(result["by_type"]), (result["axis"], _other(result["axis"])), result["checkpoints"]
    columns = min(len(kinds), PLOT_COLUMNS)
    rows = math.ceil(len(kinds) / columns)  # each a row per axis
    figure = Figure(figsize=(3.4 * columns, 5.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(axes) * rows, columns, squeeze=False)
    panels = {  # (layer type number, axis number) -> its panel: each type a column, its axes one above the other
        (number, offset): grid[len(axes) * (number // columns) + offset][number % columns]
        for number in range(rows * columns)
        for offset in range(len(axes))
    }
    for (number, _), panel in panels.items():
        panel.set_visible(number < len(kinds))
    colours = colormaps["viridis"].resampled(max(len(checkpoints), 2))
    for number, kind in enumerate(kinds):
        for offset, axis in enumerate(axes):
            panel, fit = panels[number, offset], result["by_type"][kind][axis]
            for index, name in enumerate(checkpoints):
                found = [(d, m) for i, d, m in fit["points"] if i == index]
                named = len(checkpoints) <= MAX_LEGEND or index in (0, len(checkpoints) - 1)
                label = name.removesuffix(".safetensors") if named else "_nolegend_"
                if found:
                    panel.scatter(*zip(*found), s=8, color=colours(index), label=label)
            title = f"{kind}, {axis} axis"
            if fit["slope"] is not None:
                x, y = [p[1] for p in fit["points"]], [p[2] for p in fit["points"]]
                mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)  # the least-squares line passes through the mean
                ends = [min(x), max(x)]
                panel.plot(ends, [mean_y + fit["slope"] * (e - mean_x) for e in ends], color="crimson", linewidth=1)
                title += f": slope {fit['slope']:.3g}, r {fit['r']:+.2f}"
            panel.set_title(title, fontsize=9)
            panel.set_xlabel("ΔD (1 − cosine)", fontsize=8)
            panel.set_ylabel("ΔM", fontsize=8)
            panel.xaxis.set_major_locator(MaxNLocator(4))  # ΔD's small numbers would run into each other
            panel.tick_params(labelsize=7)
    panels[0, 0].legend(fontsize=6)
    figure.suptitle("ΔM against ΔD per layer type, over layers and checkpoints (DoRA paper, figure 2)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def analyze_run(analyses: Sequence[AdapterChange], out_dir: Path) -> dict:
    """``run_result`` of a run's checkpoints, written to ``out_dir`` as ``decomposition.json`` and its PNG, each
    replaced atomically (the studio may be showing the old ones)."""
    result = run_result(analyses)
    write_bytes_atomically(Path(out_dir) / PLOT_FILE, [plot_run(result)])
    write_bytes_atomically(Path(out_dir) / RESULT_FILE, [json.dumps(result, indent=1).encode()])
    return result
