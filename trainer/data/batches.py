"""Turning an epoch's planned images into tensors: cached latent moments, or pixels for the VAE.

A ``torch.utils.data.Dataset`` whose items are whole batches, so a DataLoader with workers can read
ahead while the GPU trains, and a resumed run can start at any batch of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .epoch_plan import PlannedImage, TrainExample, load_mask, load_pixels
from .latent_cache import LatentCache


@dataclass
class Batch:
    captions: list[str]
    time_ids: Tensor  # [B, 6] SDXL micro-conditioning
    loss_weights: Tensor  # [B] each image's weight in the loss (regularization: dataset.prior_loss_weight)
    moments: Tensor | None = None  # [B, 8, h, w] posterior moments from the cache, or
    pixels: Tensor | None = None  # [B, 3, H, W] in [-1, 1] for the VAE to encode
    mask: Tensor | None = None  # [B, 1, h, w] loss masks at the latent grid (dataset.masked_loss), else None


class EpochBatches(Dataset):
    def __init__(
        self,
        batches: list[list[PlannedImage]],
        examples: list[TrainExample],
        cache: LatentCache | None,
        background: tuple[int, int, int],
    ):
        self.batches, self.examples, self.cache, self.background = batches, examples, cache, background

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        planned = self.batches[index]
        time_ids = torch.tensor([item.time_ids(self.examples[item.example]) for item in planned], dtype=torch.float32)
        captions = [item.caption for item in planned]
        weights = torch.tensor([self.examples[item.example].loss_weight for item in planned], dtype=torch.float32)
        mask = self._masks(planned)
        if self.cache is None:
            pixels = torch.stack([load_pixels(self.examples[d.example], d, self.background) for d in planned])
            return Batch(captions, time_ids, weights, pixels=pixels, mask=mask)
        moments = [self._cached(self.cache.key(self.examples[d.example], d, self.background)) for d in planned]
        return Batch(captions, time_ids, weights, moments=torch.stack(moments), mask=mask)

    def _masks(self, planned: list[PlannedImage]) -> Tensor | None:
        """The batch's loss masks, from the cache when it holds them; None when no image has one, so a run
        without masked loss is unchanged."""
        if all(self.examples[item.example].mask is None for item in planned):
            return None
        masks = []
        for item in planned:
            key = None if self.cache is None else self.cache.mask_key(self.examples[item.example], item)
            masks.append(load_mask(self.examples[item.example], item) if key is None else self._cached(key, "mask"))
        return torch.stack(masks)

    def _cached(self, key: str, name: str = "moments") -> Tensor:
        cached = self.cache.load(key, name)
        if cached is None:
            raise RuntimeError(
                f"latent cache entry {self.cache.path_for(key)} vanished during training; "
                "resume the run to encode it again"
            )
        return cached


def batch_loader(dataset: EpochBatches, start: int, workers: int) -> DataLoader:
    """Batches ``start``.. of the epoch, in order; workers read ahead without changing what is read."""
    indices = range(start, len(dataset))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
    )


def _as_is(batch: Batch) -> Batch:
    """Items are whole batches already (a module-level function, so worker processes can pickle it)."""
    return batch
