"""Cut an adapter layer's update to a lower rank by SVD, for files too large to share (VeRA's ranks: 256 and up).

The best rank-k approximation (Eckart-Young) of the update gamma * up @ down, found without building it: with
up = Q1 R1 and down^T = Q2 R2 (thin QR), up @ down = Q1 (R1 R2^T) Q2^T, so one SVD of the r x r middle gives
the update's singular vectors, and the singular values it drops give the error exactly (Eckart-Young) with
nothing weight-sized built, which matters on the CPU at VeRA's ranks (SDXL: 722 layers). A DoRA magnitude is
kept as trained: only the direction's update V - W is cut.
"""

from __future__ import annotations

import torch

from .weights import AdapterWeights


@torch.no_grad()
def truncate_rank(weights: AdapterWeights, rank: int) -> tuple[AdapterWeights, float]:
    """The layer with its update cut to ``rank``, and the cut's error relative to the update, ||E|| / ||gamma up
    down|| (Frobenius). A layer not above ``rank`` comes back as it is, with error 0. gamma = alpha/rank is kept;
    the singular values are split evenly between up and down, so neither factor dwarfs the other in fp16."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if weights.rank <= rank:
        return weights, 0.0
    up = weights.up.double().flatten(1)  # (out, r)
    down = weights.down.double().flatten(1)  # (r, in*k*k)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * root
    new_down = root[:, None] * (vh[:rank] @ q_down.T)
    dtype = weights.up.dtype
    cut = AdapterWeights(
        down=new_down.reshape(rank, *weights.down.shape[1:]).to(dtype),
        up=new_up.reshape(weights.up.shape[0], rank, *weights.up.shape[2:]).to(dtype),
        alpha=weights.gamma * rank,
        dora_scale=weights.dora_scale,
    )
    return cut, float(s[rank:].norm() / s.norm().clamp_min(1e-300))
