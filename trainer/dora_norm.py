"""Column / row norms of V = W + gamma * up @ down without building V.

DoRA needs ||V|| once per optimizer step. Building V (d x k) per layer per step would cost a weight-sized
temporary and its bandwidth; the rank-r identity needs only r-wide products:

    input axis, per column j:  ||V_j||^2 = ||W_j||^2 + 2g <(up^T W)_j, down_j> + g^2 <down_j, (up^T up) down_j>
    output axis, per row i:    ||V_i||^2 = ||W_i||^2 + 2g <up_i, (W down^T)_i> + g^2 <up_i, up_i (down down^T)>

All of it runs in float32 (a bf16 norm would move the DoRA scale near 1 in steps of 2^-8). A low-precision
base weight is read in row chunks so that no float32 copy of the whole of W exists at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapter_weights import DoraAxis

_ROW_CHUNK = 2048


def _float_row_chunks(weight2d: Tensor):
    """Yield (row slice, float32 rows) of a 2-D weight; float32 weights are yielded as one view."""
    if weight2d.dtype == torch.float32:
        yield slice(0, weight2d.shape[0]), weight2d
        return
    for start in range(0, weight2d.shape[0], _ROW_CHUNK):
        rows = slice(start, start + _ROW_CHUNK)
        yield rows, weight2d[rows].float()


def _per_input_channel(per_column: Tensor, in_channels: int) -> Tensor:
    """Sum flattened (in * kh * kw) column values over the kernel positions of each input channel."""
    return per_column.reshape(in_channels, -1).sum(dim=1)


def weight_norm_sq(weight: Tensor, axis: DoraAxis) -> Tensor:
    """||W||^2 per input channel (shape (in,)) or per output row (shape (out,)), float32."""
    w2d = weight.detach().flatten(1)
    if axis == "output":
        return torch.cat([rows.square().sum(dim=1) for _, rows in _float_row_chunks(w2d)])
    per_column = sum(rows.square().sum(dim=0) for _, rows in _float_row_chunks(w2d))
    return _per_input_channel(per_column, weight.shape[1])


@torch.no_grad()
def direction_norm(
    weight: Tensor, weight_sq: Tensor, down: Tensor, up: Tensor, gamma: float, axis: DoraAxis
) -> Tensor:
    """||V|| along ``axis`` (shape (in,) or (out,)), float32, given the cached ||W||^2 from weight_norm_sq."""
    w2d = weight.detach().flatten(1)
    a = down.detach().float().flatten(1)  # (r, k)
    b = up.detach().float().flatten(1)  # (out, r)
    if axis == "input":
        up_t_w = sum(b[rows].T @ w_rows for rows, w_rows in _float_row_chunks(w2d))  # (r, k)
        cross = (up_t_w * a).sum(dim=0)
        quad = (a * ((b.T @ b) @ a)).sum(dim=0)
        norm_sq = weight_sq + _per_input_channel(2 * gamma * cross + gamma * gamma * quad, weight.shape[1])
    else:
        w_down_t = torch.cat([w_rows @ a.T for _, w_rows in _float_row_chunks(w2d)])  # (out, r)
        cross = (b * w_down_t).sum(dim=1)
        quad = (b * (b @ (a @ a.T))).sum(dim=1)
        norm_sq = weight_sq + 2 * gamma * cross + gamma * gamma * quad
    # The sum can dip below zero by rounding when V's column is ~0; the floor keeps the scale finite.
    return norm_sq.clamp_min(0).sqrt()
