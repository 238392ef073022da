"""Cut an adapter layer's update to a lower rank by SVD: for files too large to share (``saving.export_rank``,
VeRA's ranks of 256 and up) and for ``dora-studio resize``.

The best rank-k approximation (Eckart-Young) of the update gamma * up @ down, found without building it: with
up = Q1 R1 and down^T = Q2 R2 (thin QR), up @ down = Q1 (R1 R2^T) Q2^T, so one SVD of the r x r middle gives
the update's singular vectors, and the singular values it drops give the error exactly (Eckart-Young) with
nothing weight-sized built, which matters on the CPU at VeRA's ranks (SDXL: 722 layers). A DoRA magnitude is
kept as trained: only the direction's update V - W is cut, so every column keeps the norm m it was trained to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .dora_norm import DoraAxis, weight_norm
from .weights import AdapterWeights, merged_weight

DynamicMethod = Literal["sv_ratio", "sv_fro", "sv_cumulative"]
DYNAMIC_METHODS: tuple[DynamicMethod, ...] = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_UPDATE = 1e-6  # kohya's MIN_SV: an update whose largest singular value is below this keeps rank 1
# A weight-sized change (``factor_change``) with its smaller side above this gets the randomized SVD. Measured on
# SDXL's shapes at rank 32 (2 CPU cores): as accurate as the exact one to 4 digits on a DoRA change and 3-4x
# faster (1280 x 10240: 0.7 s against 3.0 s for the exact singular values alone); the exact SVD with vectors in
# float64 took about 10 minutes per SDXL file.
EXACT_SVD_MAX_SIDE = 256
OVERSAMPLE, POWER_ITERATIONS = 10, 4


@dataclass(frozen=True)
class UpdateSVD:
    """up @ down (gamma left out, as kohya's resize leaves it) = left diag(values) right, in float64."""

    left: Tensor  # (out, r)
    values: Tensor  # (r,), descending
    right: Tensor  # (r, in * kh * kw)


@torch.no_grad()
def update_svd(weights: AdapterWeights) -> UpdateSVD:
    """The SVD of a layer's update from its factors: two thin QRs and one r x r SVD."""
    q_up, r_up = torch.linalg.qr(weights.up.double().flatten(1))  # (out, r)
    q_down, r_down = torch.linalg.qr(weights.down.double().flatten(1).T)  # (in*k*k, r)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return UpdateSVD(q_up @ u, s, vh @ q_down.T)


def dynamic_rank(values: Tensor, method: DynamicMethod, param: float) -> int:
    """The rank kohya's ``resize_lora.py`` picks for singular values ``values`` (its index rules, plus one):

    * ``sv_ratio``: the singular values above the largest / param;
    * ``sv_fro``: the fewest whose Frobenius norm reaches param of the whole (param 0.9: 90% kept);
    * ``sv_cumulative``: the fewest whose plain sum reaches param of the whole.
    """
    if method == "sv_ratio":
        index = int((values > values[0] / param).sum()) - 1
    elif method == "sv_fro":
        squares = values.square()
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), torch.tensor(param**2).double()))
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(values, 0) / values.sum(), torch.tensor(param).double()))
    else:
        raise ValueError(f"unknown dynamic method {method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    return max(0, min(index, len(values) - 1)) + 1


@torch.no_grad()
def truncate_rank(weights: AdapterWeights, rank: int, svd: UpdateSVD | None = None) -> tuple[AdapterWeights, float]:
    """The layer with its update cut to ``rank``, and the cut's error relative to the update, ||E|| / ||gamma up
    down|| (Frobenius). A layer not above ``rank`` comes back as it is, with error 0. gamma = alpha/rank is kept;
    the singular values are split evenly between up and down, so neither factor dwarfs the other in fp16."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if weights.rank <= rank:
        return weights, 0.0
    svd = svd or update_svd(weights)
    s = svd.values
    root = s[:rank].sqrt()
    new_up = svd.left[:, :rank] * root
    new_down = root[:, None] * svd.right[:rank]
    dtype = weights.up.dtype
    cut = AdapterWeights(
        down=new_down.reshape(rank, *weights.down.shape[1:]).to(dtype),
        up=new_up.reshape(weights.up.shape[0], rank, *weights.up.shape[2:]).to(dtype),
        alpha=weights.gamma * rank,
        dora_scale=weights.dora_scale,
    )
    return cut, float(s[rank:].norm() / s.norm().clamp_min(1e-300))


@torch.no_grad()
def factor_change(
    base: Tensor, target: Tensor, rank: int, gamma: float, axis: DoraAxis | None = None
) -> tuple[AdapterWeights, float]:
    """An adapter of ``rank`` that takes ``base`` to (nearly) ``target``, and how far off it is: the relative
    (Frobenius) error of its change against target - base.

    LoRA (``axis`` None): gamma * up @ down is the best rank-``rank`` approximation of the change. DoRA: the same
    factors give the direction, and the magnitudes are ``target``'s exact norms along ``axis``, so every column
    (or row) of the merged weight has exactly the target's length and only its direction is approximated. The
    SVD is exact where the change is small and PyTorch's randomized one (``torch.svd_lowrank``, rank + 10
    columns, 4 power iterations) above ``EXACT_SVD_MAX_SIDE``; the error is measured either way.
    """
    change = (target.float() - base.float()).flatten(1)
    rank = min(rank, *change.shape)
    if min(change.shape) <= EXACT_SVD_MAX_SIDE:
        u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        generator_state = torch.random.get_rng_state()  # the randomized SVD draws from the global generator
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(change, q=min(rank + OVERSAMPLE, *change.shape), niter=POWER_ITERATIONS)
        torch.random.set_rng_state(generator_state)
        u, s, v = u[:, :rank].double(), s[:rank].double(), v[:, :rank].double()
    root = (s / gamma).sqrt()
    up, down = u * root, (v * root).T
    error = float((up @ down * gamma - change.double()).norm() / change.double().norm().clamp_min(1e-300))
    kernel = base.shape[2:]
    factors = AdapterWeights(
        down=down.reshape(rank, *base.shape[1:]).float(),
        up=up.reshape(base.shape[0], rank, *([1] * len(kernel))).float(),
        alpha=gamma * rank,
        dora_scale=None if axis is None else weight_norm(target.float(), axis),
    )
    return factors, error


def _channels(weight: Tensor, axis: DoraAxis) -> Tensor:
    """A weight as one row per magnitude channel: (in, out * kh * kw) on the input axis, (out, rest) on the output."""
    return weight.transpose(0, 1).flatten(1) if axis == "input" else weight.flatten(1)


@torch.no_grad()
def dora_from_target(
    base: Tensor, target: Tensor, rank: int, axis: DoraAxis, max_rounds: int = 32
) -> tuple[AdapterWeights, float]:
    """A DoRA of ``rank`` taking ``base`` to (nearly) ``target``: magnitudes the target's exact norms, and a
    direction V = W + up @ down that points each channel (column or row) along the target's; and how far off the
    merged weight is, ||W' - target|| / ||target - W|| (Frobenius).

    Only each channel's direction matters to DoRA, so V may be the target with every channel rescaled by some
    k > 0; ``factor_change`` with k = 1 would spend the rank on the magnitude change as well (W's own columns,
    rescaled: full rank). k is chosen so that V - W is as close to low rank as it gets, alternating a least
    squares k against the current V and the best rank-``rank`` V - W for that k, until the error falls by less
    than 1% in a round (or ``max_rounds``). On a target that is exactly a DoRA of ``rank`` over ``base``, the
    tiny model's layers reach 1e-5 to 1e-7 in 16 to 64 rounds, where a LoRA of the same rank stays near 0.7
    (tests/test_extract.py); a real fine-tune's error stops falling much sooner, at what rank R can hold.
    """
    base, target = base.float(), target.float()
    rows, magnitude = _channels(target, axis), weight_norm(target, axis)
    lengths = rows.square().sum(dim=1).clamp_min(1e-30)
    shape = (1, -1, *[1] * (base.dim() - 2)) if axis == "input" else (-1, *[1] * (base.dim() - 1))
    change = (target - base).norm().clamp_min(1e-30)
    guess, best, best_error = base, None, float("inf")
    for _ in range(max_rounds):
        scale = (rows * _channels(guess, axis)).sum(dim=1) / lengths  # k per channel, least squares
        factors, _ = factor_change(base, target * scale.clamp_min(1e-8).reshape(shape), rank, gamma=1.0)
        factors.dora_scale = magnitude
        error = float((merged_weight(base, factors) - target).norm() / change)
        falling = error < 0.99 * best_error
        if error < best_error:
            best, best_error = factors, error
        if not falling or best_error < 1e-7:
            break
        guess = base + factors.delta_weight()
    return best, best_error
