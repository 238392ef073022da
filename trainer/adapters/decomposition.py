"""The DoRA paper's weight-decomposition analysis (Liu et al. 2024, arXiv 2402.09353, section 3, figure 2).

The paper splits each weight into magnitude (the norms of its vectors) and direction (the unit vectors) to
ask how a method learns: per layer, ΔM = mean |‖W'_j‖ − ‖W0_j‖| and ΔD = mean (1 − cos(W'_j, W0_j)) over the
vectors j. Across layers and training steps, full fine-tuning and DoRA show a negative relation between the
two, LoRA a positive one. ``dora-studio analyze`` and ``bench/quality.py`` both measure with these functions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .dora_norm import DoraAxis


def _vectors(weight: Tensor, axis: DoraAxis) -> Tensor:
    """The vectors DoRA normalises on ``axis``, one per row, in float64.

    "output": one per output feature, over the input features and kernel positions (PEFT's norm);
    "input": one per input channel, over the output features and kernel positions (kohya's and LyCORIS's,
    the ``(1, in, 1, 1)`` magnitude of a conv). For a Linear these are the rows and the columns of W.
    """
    weight = weight.double()
    return weight.flatten(1) if axis == "output" else weight.transpose(0, 1).flatten(1)


def decomposition_change(base: Tensor, tuned: Tensor, axis: DoraAxis) -> tuple[float, float]:
    """(ΔM, ΔD) of one layer: mean magnitude change and mean direction change (1 − cosine) of its vectors."""
    base, tuned = _vectors(base, axis), _vectors(tuned, axis)
    magnitude = (torch.linalg.vector_norm(tuned, dim=1) - torch.linalg.vector_norm(base, dim=1)).abs().mean()
    direction = 1 - torch.nn.functional.cosine_similarity(tuned, base, dim=1).mean()
    return float(magnitude), float(direction)


def slope_and_correlation(direction: list[float], magnitude: list[float]) -> tuple[float, float]:
    """Least-squares slope of ΔM against ΔD and Pearson's r: the paper's sign test of how a method learns."""
    x, y = np.asarray(direction), np.asarray(magnitude)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    slope = float(np.polyfit(x, y, 1)[0])
    return slope, float(np.corrcoef(x, y)[0, 1])
