"""Cutting an adapter's update to a lower rank (saving.export_rank): the best rank-k update, by an independent SVD."""

from __future__ import annotations

import pytest
import torch

from trainer.adapters.low_rank import truncate_rank
from trainer.adapters.weights import AdapterWeights, merged_weight


def _weights(out: int, rank: int, inner: tuple[int, ...], dora: bool, seed: int = 0) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    dora_scale = torch.rand(1, inner[0], *([1] * (len(inner) - 1)), generator=generator) + 0.5 if dora else None
    up_shape = (out, rank, *([1] * (len(inner) - 1)))
    return AdapterWeights(
        down=torch.randn(rank, *inner, generator=generator),
        up=torch.randn(up_shape, generator=generator),
        alpha=rank / 2,
        dora_scale=dora_scale,
    )


@pytest.mark.parametrize("inner", [(24,), (5, 3, 3)], ids=["linear", "conv3x3"])
def test_the_cut_update_is_the_best_rank_k_approximation(inner):
    full = _weights(20, 12, inner, dora=False)
    cut, error = truncate_rank(full, 4)
    assert cut.rank == 4 and cut.gamma == pytest.approx(full.gamma)
    assert cut.down.shape == (4, *inner) and cut.up.shape[:2] == (20, 4)
    update = full.gamma * full.delta_weight(torch.float64).flatten(1)
    u, s, vh = torch.linalg.svd(update)  # the whole update, built and decomposed directly
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(cut.gamma * cut.delta_weight(torch.float64).flatten(1), best.float().double(), atol=1e-4)
    assert error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-6)  # Eckart-Young
    difference = (full.delta_weight(torch.float64) - cut.delta_weight(torch.float64)).norm()
    assert error == pytest.approx(float(difference / full.delta_weight(torch.float64).norm()), rel=1e-4)


def test_an_update_of_low_rank_is_kept_exactly_and_a_small_rank_is_left_alone():
    low = _weights(16, 3, (10,), dora=True)
    padded = AdapterWeights(  # rank 3 written as rank 8: five zero directions
        down=torch.cat([low.down, torch.zeros(5, 10)]), up=torch.cat([low.up, torch.randn(16, 5)], 1), alpha=4.0,
        dora_scale=low.dora_scale,
    )  # fmt: skip
    cut, error = truncate_rank(padded, 3)
    base = torch.randn(16, 10)
    assert torch.allclose(merged_weight(base, cut), merged_weight(base, padded), atol=1e-5)
    assert torch.equal(cut.dora_scale, padded.dora_scale) and error < 1e-6
    assert truncate_rank(low, 3) == (low, 0.0) and truncate_rank(low, 8)[0] is low
