"""The validation measurement's fixed inputs: each held-out image gets the same noise at each timestep whatever
batch or process it lands in, in batches that never mix buckets, with its caption fixed and never flipped.
(That a whole run's validation loss is identical across a stop and resume is in test_training.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from trainer.data.buckets import BucketSpec
from trainer.data.captions import CaptionOptions
from trainer.data.epoch_plan import AugmentOptions, TrainExample
from trainer.training.validation import VALIDATION_TIMESTEPS, fixed_noise, validation_batches

SPEC = BucketSpec(resolution=64, min_side=64, max_side=128, step=64)


def test_noise_depends_on_the_image_and_timestep_only():
    session = SimpleNamespace(augment=AugmentOptions(SPEC))
    options = CaptionOptions(trigger_word="zqx", shuffle_tags=False)
    examples = [
        TrainExample(Path(f"{i}.png"), f"tag {i}, b", 1, size, size, options, flip=True)
        for i, size in enumerate([(64, 64), (128, 64), (64, 64), (64, 64)])
    ]
    one_batch = validation_batches(examples, session, batch_size=8)
    singles = validation_batches(examples, session, batch_size=1)
    assert [[image.example for image in batch] for batch in one_batch] == [[0, 2, 3], [1]]  # buckets apart
    assert [len(batch) for batch in singles] == [1, 1, 1, 1]
    assert all(not image.flipped and image.caption.startswith("zqx, tag") for b in one_batch for image in b)

    shape = (4, 8, 8)
    together = fixed_noise(3, one_batch[0], shape, 500)
    alone = [fixed_noise(3, batch, shape, 500) for batch in singles if batch[0].example in (0, 2, 3)]
    assert torch.equal(together.noise, torch.cat([noise.noise for noise in alone]))
    assert torch.equal(together.latent, torch.cat([noise.latent for noise in alone]))
    assert together.timesteps.tolist() == [500, 500, 500]
    assert not torch.equal(fixed_noise(3, one_batch[0], shape, 350).noise, together.noise)
    assert not torch.equal(fixed_noise(4, one_batch[0], shape, 500).noise, together.noise)
    assert len(VALIDATION_TIMESTEPS) == 5 and max(VALIDATION_TIMESTEPS) < 1000
