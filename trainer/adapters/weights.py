"""One adapted layer as a kohya file stores it, and the exact merge every other module agrees on.

The layer classes (``trainer.adapters.layers``), the file reader/writer (``trainer.kohya.adapter_file``) and the
front-end checks (``trainer.kohya.frontend_merge``) all speak this one type, so the shapes of
``docs/adapter-format.md`` section 1 are written down once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dora_norm import DoraAxis, weight_norm

# Norm floor: front ends add float32 eps to ||V||; we floor at it instead, so that a fresh adapter
# (m == ||W||) is bit-exactly the identity. The two differ by at most eps/||V|| relative (~1e-7).
NORM_EPS = torch.finfo(torch.float32).eps


@dataclass
class AdapterWeights:
    """Tensors of one stem, in file shapes.

    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1);
    dora_scale: None for LoRA, else (1, in[, 1, 1]) for the input axis or (out, 1[, 1, 1]) for output.
    """

    down: Tensor
    up: Tensor
    alpha: float
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def gamma(self) -> float:
        return self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def dora_axis(self) -> DoraAxis | None:
        """Which axis the magnitude lives on, read from its shape (docs/adapter-format.md section 1)."""
        if self.dora_scale is None:
            return None
        return dora_axis_from_shape(tuple(self.dora_scale.shape), self.up.shape[0], self.down.shape[1])

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """dW = up @ down, reshaped to the base weight's shape (without gamma)."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype)
        delta = up @ down.flatten(1)
        return delta.reshape(up.shape[0], *down.shape[1:])


def dora_axis_from_shape(scale_shape: tuple[int, ...], out_features: int, in_features: int) -> DoraAxis:
    """Tell the DoRA axis from a ``dora_scale`` shape; raise if it fits neither."""
    rest = scale_shape[2:]
    if any(d != 1 for d in rest) or len(scale_shape) < 2:
        raise ValueError(f"dora_scale shape {scale_shape} is not (1, in[,1,1]) or (out, 1[,1,1])")
    if scale_shape[:2] == (1, in_features) and (in_features != 1 or out_features == 1):
        return "input"
    if scale_shape[:2] == (out_features, 1):
        return "output"
    raise ValueError(
        f"dora_scale shape {scale_shape} fits neither axis of a layer with out={out_features}, in={in_features}"
    )


def merged_weight(base: Tensor, weights: AdapterWeights, strength: float = 1.0) -> Tensor:
    """W_s = W + s * (W' - W) in float32, with W' = W + gamma*dW for LoRA, DoRA per docs/adapter-format.md section 4."""
    w = base.float()
    delta = weights.delta_weight(torch.float32)
    if weights.dora_scale is None:
        return w + (strength * weights.gamma) * delta
    v = w + weights.gamma * delta
    axis = weights.dora_axis
    assert axis is not None
    scale = weights.dora_scale.float() / weight_norm(v, axis).clamp_min(NORM_EPS)
    return w + strength * (v * scale - w)
