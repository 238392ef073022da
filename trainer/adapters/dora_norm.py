"""Column / row norms of W, and of V = W + gamma * up @ down without building V.

DoRA needs ||V|| once per optimizer step. Building V (d x k) per layer per step would cost a weight-sized
temporary and its bandwidth; the rank-r identity needs only r-wide products:

    input axis, per column j:  ||V_j||^2 = ||W_j||^2 + 2g <(up^T W)_j, down_j> + g^2 <down_j, (up^T up) down_j>
    output axis, per row i:    ||V_i||^2 = ||W_i||^2 + 2g <up_i, (W down^T)_i> + g^2 <up_i, up_i (down down^T)>

All of it runs in float32 (a bf16 norm would move the DoRA scale near 1 in steps of 2^-8). A low-precision
base weight is read in row chunks so that no float32 copy of the whole of W exists at once.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

DoraAxis = Literal["input", "output"]
DORA_AXES: tuple[DoraAxis, ...] = ("input", "output")
_ROW_CHUNK = 2048


def dora_scale_shape(weight_shape: tuple[int, ...], axis: DoraAxis) -> tuple[int, ...]:
    """The magnitude's shape in the file: (1, in[, 1, 1]) for the input axis, (out, 1[, 1, 1]) for the output."""
    rest = [1] * (len(weight_shape) - 2)
    return (1, weight_shape[1], *rest) if axis == "input" else (weight_shape[0], 1, *rest)


def _float_row_chunks(weight2d: Tensor):
    """Yield (row slice, float32 rows) of a 2-D weight; float32 weights are yielded as one view."""
    if weight2d.dtype == torch.float32:
        yield slice(0, weight2d.shape[0]), weight2d
        return
    for start in range(0, weight2d.shape[0], _ROW_CHUNK):
        rows = slice(start, start + _ROW_CHUNK)
        yield rows, weight2d[rows].float()


def _per_input_channel(per_column: Tensor, in_channels: int) -> Tensor:
    """Sum flattened (in * kh * kw) column values (the last dim) over the kernel positions of each input channel."""
    return per_column.reshape(*per_column.shape[:-1], in_channels, -1).sum(dim=-1)


def weight_norm_sq(weight: Tensor, axis: DoraAxis) -> Tensor:
    """||W||^2 per input channel (over out and kernel dims; shape (in,)) or per output row (shape (out,)), float32."""
    w2d = weight.detach().flatten(1)
    if axis == "output":
        return torch.cat([rows.square().sum(dim=1) for _, rows in _float_row_chunks(w2d)])
    per_column = sum(rows.square().sum(dim=0) for _, rows in _float_row_chunks(w2d))
    return _per_input_channel(per_column, weight.shape[1])


def weight_norm(weight: Tensor, axis: DoraAxis) -> Tensor:
    """||W|| along ``axis`` in ``dora_scale``'s shape, float32: what a fresh magnitude is."""
    return weight_norm_sq(weight, axis).sqrt().reshape(dora_scale_shape(tuple(weight.shape), axis))


def _rows_times(weight2d: Tensor, other: Tensor, transpose_w: bool) -> Tensor:
    """W^T @ other (transpose_w) or W @ other, in float32, reading a low-precision W in row chunks.

    Both are (large x small) products with the rank as the narrow dimension: the BLAS kernels run them at
    up to 1.6x the rate of the (rank x large) product ``other^T @ W`` (docs/benchmarks.md: SDXL 1.22 s -> 0.88 s).
    """
    if weight2d.dtype == torch.float32:  # one GEMM, no generator: this runs per layer per optimizer step
        return weight2d.T @ other if transpose_w else weight2d @ other
    if transpose_w:
        return sum(w_rows.T @ other[rows] for rows, w_rows in _float_row_chunks(weight2d))
    return torch.cat([w_rows @ other for _, w_rows in _float_row_chunks(weight2d)])


@torch.no_grad()
def direction_norm(weight: Tensor, weight_sq: Tensor, down: Tensor, up: Tensor, gamma: float, axis: DoraAxis) -> Tensor:
    """||V|| along ``axis`` (shape (in,) or (out,)), float32, given the cached ||W||^2 from weight_norm_sq."""
    return direction_norms([weight], [weight_sq], [down], [up], gamma, axis)[0]


@torch.no_grad()
def direction_norms(
    weights: list[Tensor],
    weight_sqs: list[Tensor],
    downs: list[Tensor],
    ups: list[Tensor],
    gamma: float,
    axis: DoraAxis,
) -> Tensor:
    """``direction_norm`` of layers with the same shapes, stacked: (layers, in) or (layers, out).

    Both cross and quadratic terms come from one rank-sized product T, e.g. for the input axis
    T = W^T up + (g/2) down^T (up^T up), and ||V_j||^2 = ||W_j||^2 + 2g <down_j, T_j>.
    Only W's product is taken layer by layer (each W is read once); the rank-sized rest runs batched, a
    handful of kernels for all the layers instead of a dozen per layer. One layer is a batch of one, so a
    layer's norm is the same number whichever way it is computed.
    """
    a = torch.stack([down.float().flatten(1) for down in downs])  # (n, r, k)
    b = torch.stack([up.float().flatten(1) for up in ups])  # (n, out, r)
    weight_sq = torch.stack(weight_sqs)
    if axis == "input":
        w_products = torch.stack([_rows_times(w.flatten(1), b_i, transpose_w=True) for w, b_i in zip(weights, b)])
        t = torch.baddbmm(w_products, a.mT, b.mT @ b, alpha=gamma / 2)  # (n, k, r)
        per_column = (a.mT * t).sum(dim=2)
        if per_column.shape[1] != weight_sq.shape[1]:  # conv: fold kernel positions into their input channel
            per_column = _per_input_channel(per_column, weight_sq.shape[1])
        norm_sq = torch.add(weight_sq, per_column, alpha=2 * gamma)
    else:
        w_products = torch.stack([_rows_times(w.flatten(1), a_i.T, transpose_w=False) for w, a_i in zip(weights, a)])
        t = torch.baddbmm(w_products, b, a @ a.mT, alpha=gamma / 2)  # (n, out, r)
        norm_sq = torch.add(weight_sq, (b * t).sum(dim=2), alpha=2 * gamma)
    # The sum can dip below zero by rounding when V's column is ~0; the floor keeps the scale finite.
    return norm_sq.clamp_min_(0).sqrt_()
