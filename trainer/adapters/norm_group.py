"""DoRA layers whose once-per-step norms are computed together, and the refresh a compiled forward needs."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch

from .dora_norm import direction_norms
from .layers import DoRALayer, LoRALayer
from .quantized import is_quantized
from .weights import NORM_EPS

# The factors one batched norm computation stacks, at most: all the layers of a shape at LoRA's ranks (SDXL's
# largest batch, 372 layers of 1280x1280, is 58 MB at rank 16); VeRA's ranks (256 and up) would stack gigabytes.
NORM_BATCH_BYTES = 64 * 2**20


class DoRANormGroup:
    """DoRA layers whose once-per-step norms are computed together.

    When one layer of the group finds its norm stale (the first forward after an optimizer step), every stale
    layer is refreshed, those of one shape in one batched computation (``dora_norm.direction_norms``): a few
    kernels per shape instead of a dozen per layer, which is most of DoRA's fixed cost per step on small
    layers and, on a GPU, thousands of kernel launches. Layers over a quantized base keep their own path, which
    hands the forward the weight it dequantized.
    """

    def __init__(self, layers: Iterable[DoRALayer]):
        self.layers = list(layers)
        for layer in self.layers:
            layer.norm_group = self

    @torch.no_grad()
    def refresh(self) -> None:
        batches: dict[tuple, list[tuple[DoRALayer, torch.Tensor, tuple]]] = defaultdict(list)
        for layer in self.layers:
            base = layer.base
            if is_quantized(base) or (key := layer._norm_key()) == layer._norm_cache_key:
                continue
            weight = base.weight
            kind = (weight.shape, weight.dtype, weight.device, layer.down_shape, layer.gamma, layer.spec.dora_axis)
            batches[kind].append((layer, weight, key))
        for members in batches.values():
            for chunk in _chunks(members, per_chunk=max(1, NORM_BATCH_BYTES // _factor_bytes(members[0][0]))):
                layers = [layer for layer, _, _ in chunk]
                factors = [layer.factors() for layer in layers]  # VeRA's are computed: only a chunk's at once
                norms = direction_norms(
                    [weight for _, weight, _ in chunk],
                    [layer.weight_norm_sq for layer in layers],
                    [down for down, _ in factors],
                    [up for _, up in factors],
                    gamma=layers[0].gamma,  # the same for the whole batch: both are part of its kind
                    axis=layers[0].spec.dora_axis,
                )
                for (layer, _, key), norm in zip(chunk, norms.clamp_min_(NORM_EPS)):
                    layer._keep_norm(norm, key)


def _factor_bytes(layer: LoRALayer) -> int:
    """What one layer adds to a norm batch: its two factors in float32 (stacked once more inside)."""
    return 4 * (math.prod(layer.down_shape) + math.prod(layer.up_shape))


def _chunks(items: list, per_chunk: int) -> Iterator[list]:
    for start in range(0, len(items), per_chunk):
        yield items[start : start + per_chunk]


def refresh_norms(layers: Iterable[LoRALayer]) -> None:
    """Bring every DoRA layer's cached norm up to date now. A compiled forward (``training.compile``) reads the
    cache without checking it, as the check (version counters, data pointers) cannot be traced: call this
    after each optimizer step, before the forward."""
    for layer in layers:
        if isinstance(layer, DoRALayer):
            layer.direction_norm()
