"""Turning an epoch's planned images into tensors: cached latent moments, or pixels for the VAE.

A ``torch.utils.data.Dataset`` whose items are whole batches, so a DataLoader with workers can read
ahead while the GPU trains, and a resumed run can start at any batch of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .epoch_plan import PlannedImage, TrainExample, load_pixels
from .latent_cache import LatentCache


@dataclass
class Batch:
    captions: list[str]
    time_ids: Tensor  # [B, 6] SDXL micro-conditioning
    loss_weights: Tensor  # [B] each image's weight in the loss (regularization: dataset.prior_loss_weight)
    moments: Tensor | None = None  # [B, 8, h, w] posterior moments from the cache, or
    pixels: Tensor | None = None  # [B, 3, H, W] in [-1, 1] for the VAE to encode


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
        if self.cache is None:
            pixels = torch.stack([load_pixels(self.examples[d.example], d, self.background) for d in planned])
            return Batch(captions, time_ids, weights, pixels=pixels)
        moments = []
        for item in planned:
            key = self.cache.key(self.examples[item.example], item, self.background)
            cached = self.cache.load(key)
            if cached is None:
                raise RuntimeError(
                    f"latent cache entry {self.cache.path_for(key)} vanished during training; "
                    "resume the run to encode it again"
                )
            moments.append(cached)
        return Batch(captions, time_ids, weights, moments=torch.stack(moments))


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
