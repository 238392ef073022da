"""Masked loss: masks found, checked, cropped, flipped, cached and weighed into the loss.

Expected masks are computed here with numpy from the mask files (slicing for the crop, reversing for the
flip, 8x8 block means for the latent grid), and expected losses in float64 from those, never read back from
the module under test.
"""

import copy
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from trainer.builtin.tiny import ARCHITECTURE, TINY_VAE_CONFIG
from trainer.config.parsing import from_dict
from trainer.data.batches import EpochBatches
from trainer.data.buckets import BucketSpec
from trainer.data.epoch_plan import AugmentOptions, PlannedImage, load_mask, load_pixels, plan_examples, plan_image
from trainer.data.latent_cache import LatentCache, fill_cache
from trainer.data.masks import FULL_MASK, MaskSource, mask_weights
from trainer.data.scan import scan_subsets
from trainer.data.subsets import SubsetFolder
from trainer.errors import DatasetError
from trainer.sdxl.configs import SDXL_SCHEDULER_CONFIG
from trainer.sdxl.objective import denoising_loss, training_noise_scheduler
from trainer.training.simulated_run import SimulatedRun
from trainer.training.step import training_loss

SPEC_64 = BucketSpec(resolution=64, min_side=64, max_side=128, step=64)  # one 64x64 bucket
SPEC_128 = BucketSpec(resolution=128, min_side=128, max_side=128, step=64)  # one 128x128 bucket
WHITE = (255, 255, 255)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny convolutions run faster on one thread


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def gradient(width: int, height: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, (rows * 2) % 256, (cols * 7 + rows * 3) % 256], axis=-1)


def blocky_mask(width: int, height: int, seed: int) -> np.ndarray:
    """Random grey levels, constant over 2x2 blocks: halving the size is exact, so it can be done by hand."""
    half = np.random.default_rng(seed).integers(0, 256, (height // 2, width // 2))
    return half.repeat(2, axis=0).repeat(2, axis=1)


def latent_by_hand(mask: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H/8, W/8] block means, in float64."""
    height, width = mask.shape
    return mask.reshape(height // 8, 8, width // 8, 8).mean(axis=(1, 3))


def masked_scan(root: Path, masks: Path | None, masked_loss: bool = True):
    return scan_subsets([SubsetFolder(root, mask_path=masks)], masked_loss=masked_loss)


def augment(spec: BucketSpec = SPEC_64, random_crop: bool = False) -> AugmentOptions:
    return AugmentOptions(bucket_spec=spec, random_crop=random_crop)


@pytest.fixture
def wide(tmp_path):
    """A 256x128 image and its asymmetric mask: it shrinks to 128x64 and is cropped from 64 px spare width."""
    save(tmp_path / "data" / "wide.png", gradient(256, 128))
    mask = blocky_mask(256, 128, seed=1)
    save(tmp_path / "masks" / "wide.png", mask)
    return tmp_path, mask


# --- the mask follows the image --------------------------------------------------------------------------------


@pytest.mark.parametrize("flipped", [False, True])
def test_masked_loss_is_the_error_weighted_by_the_mask_file_by_hand(wide, flipped):
    root, mask_file = wide
    (example,) = plan_examples(masked_scan(root / "data", root / "masks"), SPEC_64)
    assert example.mask == MaskSource(root / "masks" / "wide.png")
    draw = PlannedImage(0, plan_image(example, 0, augment(), random.Random(0)).crop, flipped, "")
    assert draw.crop.resized_size == (128, 64) and draw.crop.crop_top_left == (0, 32)

    expected = mask_file[::2, ::2][:, 32:96] / 255.0  # halved, then the centre crop
    expected = latent_by_hand(expected[:, ::-1] if flipped else expected)
    mask = EpochBatches([[draw]], [example], None, WHITE)[0].mask
    assert mask.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(mask[0, 0].numpy(), expected, rtol=0, atol=1e-6)

    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    for unmasked_weight in (0.0, 0.25):
        weights = unmasked_weight + (1 - unmasked_weight) * expected
        by_hand = ((prediction.double() - target.double()) ** 2 * torch.from_numpy(weights)).mean()
        loss = denoising_loss(
            scheduler, prediction, target, torch.tensor([500]), 0.0, mask_weights(mask, unmasked_weight)
        )
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize(("size", "spec"), [((256, 128), SPEC_64), ((96, 64), SPEC_128)], ids=["shrunk", "enlarged"])
def test_the_mask_takes_every_crop_and_flip_of_its_image(tmp_path, size, spec):
    """An image whose grey levels are its own mask: every random crop, flip, shrink (box) or enlargement
    (Lanczos) of the pixels must give the same values as the mask's."""
    grey = blocky_mask(*size, seed=3)
    save(tmp_path / "data" / "a.png", np.repeat(grey[..., None], 3, axis=-1))
    save(tmp_path / "masks" / "a.png", grey)
    (example,) = plan_examples(masked_scan(tmp_path / "data", tmp_path / "masks"), spec)
    draws = [plan_image(example, 0, augment(spec, random_crop=True), random.Random(seed)) for seed in range(6)]
    draws = [PlannedImage(0, draw.crop, seed % 2 == 1, "") for seed, draw in enumerate(draws)]
    assert len({draw.crop.crop_top_left for draw in draws}) > 2
    for draw in draws:
        pixels = (load_pixels(example, draw, WHITE)[0].double() + 1) * 127.5 / 255
        expected = latent_by_hand(pixels.numpy())
        np.testing.assert_allclose(load_mask(example, draw)[0].numpy(), expected, rtol=0, atol=1e-5)


def test_alpha_channel_is_the_mask_and_an_opaque_image_trains_whole(tmp_path):
    rgba = np.concatenate([gradient(96, 64), blocky_mask(96, 64, seed=4)[..., None]], axis=-1)
    save(tmp_path / "data" / "cutout.png", rgba)
    save(tmp_path / "data" / "photo.png", gradient(64, 64))
    scan = masked_scan(tmp_path / "data", None)
    (notice,) = [problem for problem in scan.problems if problem.kind == "no_mask"]
    assert notice.path.name == "photo.png" and not notice.skipped
    assert "photo.png: no mask: trains on the whole image" in notice.message
    cutout, photo = sorted(plan_examples(scan, SPEC_64), key=lambda e: e.path.name)
    assert cutout.mask == MaskSource(cutout.path, alpha=True) and photo.mask == FULL_MASK

    draw = PlannedImage(0, plan_image(cutout, 0, augment(), random.Random(0)).crop, True, "")
    assert draw.crop.crop_top_left == (0, 16)
    expected = latent_by_hand(rgba[:, 16:80, 3][:, ::-1] / 255.0)
    np.testing.assert_allclose(load_mask(cutout, draw)[0].numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(load_mask(photo, draw), torch.ones(1, 8, 8))
    # the pixels are what they are without masked loss: transparency still goes onto the background
    unmasked = plan_examples(masked_scan(tmp_path / "data", None, masked_loss=False), SPEC_64)
    assert unmasked[0].mask is None
    assert torch.equal(load_pixels(cutout, draw, WHITE), load_pixels(unmasked[0], draw, WHITE))


# --- masks that are missing or do not fit --------------------------------------------------------------------


def test_missing_mask_is_named_and_trains_unmasked(wide):
    root, _ = wide
    save(root / "data" / "10_more" / "plain.png", gradient(64, 64))
    save(root / "masks" / "10_more" / "other.png", np.zeros((64, 64)))
    scan = masked_scan(root / "data", root / "masks")
    (missing,) = [problem for problem in scan.problems if "mask" in problem.kind]
    assert missing.kind == "missing_mask" and not missing.skipped
    assert missing.path == root / "data" / "10_more" / "plain.png"
    assert str(missing.path) in missing.message and str(root / "masks") in missing.message
    assert "no mask: trains on the whole image" in missing.message
    by_name = {e.path.name: e for e in plan_examples(scan, SPEC_64)}
    assert by_name["plain.png"].mask == FULL_MASK and by_name["wide.png"].mask.path == root / "masks" / "wide.png"


def test_mask_found_in_the_images_subfolder_before_the_top_of_the_mask_folder(tmp_path):
    save(tmp_path / "data" / "10_char" / "a.png", gradient(64, 64))
    save(tmp_path / "masks" / "a.webp", np.zeros((64, 64)))
    scan = masked_scan(tmp_path / "data", tmp_path / "masks")
    assert scan.items[0].mask.path == tmp_path / "masks" / "a.webp"  # flat, as kohya's conditioning_data_dir
    save(tmp_path / "masks" / "10_char" / "a.png", np.zeros((64, 64)))
    scan = masked_scan(tmp_path / "data", tmp_path / "masks")
    assert scan.items[0].mask.path == tmp_path / "masks" / "10_char" / "a.png"
    assert not [problem for problem in scan.problems if "mask" in problem.kind]


def test_mask_of_another_size_is_an_error_naming_both_files_and_sizes(wide):
    root, _ = wide
    save(root / "data" / "b.png", gradient(96, 64))
    save(root / "masks" / "b.jpg", np.zeros((64, 64)))
    with pytest.raises(DatasetError) as raised:
        masked_scan(root / "data", root / "masks")
    (problem,) = raised.value.problems
    assert problem.where == str(root / "masks" / "b.jpg")
    assert str(root / "data" / "b.png") in problem.message
    assert "64x64" in problem.message and "96x64" in problem.message


# --- the loss: exactly unmasked where nothing is masked --------------------------------------------------------


@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_white_mask_and_unmasked_weight_one_give_exactly_the_unmasked_loss(tmp_path, min_snr_gamma):
    save(tmp_path / "data" / "a.png", gradient(96, 64))
    save(tmp_path / "masks" / "a.png", np.full((64, 96), 255))
    (example,) = plan_examples(masked_scan(tmp_path / "data", tmp_path / "masks"), SPEC_64)
    white = load_mask(example, plan_image(example, 0, augment(), random.Random(0)))[None]
    assert torch.equal(white, torch.ones(1, 1, 8, 8))
    generator = torch.Generator().manual_seed(5)
    prediction = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.bfloat16)
    target, timesteps = torch.randn(3, 4, 8, 8, generator=generator), torch.tensor([0, 400, 999])
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "v_prediction", zero_terminal_snr=True)
    unmasked = denoising_loss(scheduler, prediction, target, timesteps, min_snr_gamma)
    soft = torch.rand(3, 1, 8, 8, generator=generator)
    for weights in (mask_weights(white.expand(3, 1, 8, 8), 0.0), mask_weights(soft, 1.0)):
        assert torch.equal(denoising_loss(scheduler, prediction, target, timesteps, min_snr_gamma, weights), unmasked)
    masked = denoising_loss(scheduler, prediction, target, timesteps, min_snr_gamma, mask_weights(soft, 0.0))
    assert (masked <= unmasked).all() and (masked < unmasked).any()  # v-prediction weighs t=999 by 0


def test_min_snr_weighting_multiplies_the_masked_loss_as_before():
    generator = torch.Generator().manual_seed(6)
    prediction, target = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 200, 500, 900])
    scheduler = training_noise_scheduler(SDXL_SCHEDULER_CONFIG, "epsilon", zero_terminal_snr=False)
    snr_weights = denoising_loss(scheduler, prediction, target, timesteps, 5.0) / denoising_loss(
        scheduler, prediction, target, timesteps, 0.0
    )
    assert (snr_weights < 0.99).any()
    weights = mask_weights(torch.rand(4, 1, 8, 8, generator=generator), 0.1)
    torch.testing.assert_close(
        denoising_loss(scheduler, prediction, target, timesteps, 5.0, weights),
        denoising_loss(scheduler, prediction, target, timesteps, 0.0, weights) * snr_weights,
    )


# --- caching ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**copy.deepcopy(TINY_VAE_CONFIG)).eval()


def test_cached_and_uncached_batches_give_the_same_masks(wide, vae):
    root, _ = wide
    rgba = np.concatenate([gradient(64, 64), blocky_mask(64, 64, seed=7)[..., None]], axis=-1)
    save(root / "cutouts" / "cutout.png", rgba)
    save(root / "cutouts" / "photo.png", gradient(64, 64))
    subsets = [SubsetFolder(root / "data", mask_path=root / "masks"), SubsetFolder(root / "cutouts")]
    examples = plan_examples(scan_subsets(subsets, masked_loss=True), SPEC_64)
    assert [e.mask for e in examples] == [
        MaskSource(root / "masks" / "wide.png"),
        MaskSource(root / "cutouts" / "cutout.png", alpha=True),
        FULL_MASK,
    ]
    draws = [
        PlannedImage(index, plan_image(example, index, augment(), random.Random(0)).crop, flipped, "")
        for index, example in enumerate(examples)
        for flipped in (False, True)
    ]
    cache = LatentCache(root / "cache", "tiny")
    assert fill_cache(cache, examples, draws, vae, WHITE).encoded == 6
    assert len(list(cache.folder.rglob("*-mask.safetensors"))) == 2  # each crop's mask beside its moments
    assert len(list(cache.folder.rglob("*-alpha.safetensors"))) == 2  # (all-ones masks are not stored)
    cached, fresh = EpochBatches([draws], examples, cache, WHITE)[0], EpochBatches([draws], examples, None, WHITE)[0]
    assert cached.moments is not None and fresh.pixels is not None
    assert cached.mask.shape == (6, 1, 8, 8) and cached.mask.dtype == torch.float32
    assert torch.equal(cached.mask, fresh.mask)
    assert not torch.equal(cached.mask[2], cached.mask[3]) and torch.equal(cached.mask[4:], torch.ones(2, 1, 8, 8))
    # without masked loss a batch has no mask at all, from the cache or not
    plain = plan_examples(scan_subsets([SubsetFolder(root / "data"), SubsetFolder(root / "cutouts")]), SPEC_64)
    assert EpochBatches([draws], plain, cache, WHITE)[0].mask is None
    assert EpochBatches([draws], plain, None, WHITE)[0].mask is None


def test_a_changed_mask_file_changes_the_mask_key_and_nothing_else(wide):
    root, mask = wide
    (example,) = plan_examples(masked_scan(root / "data", root / "masks"), SPEC_64)
    draw = plan_image(example, 0, augment(), random.Random(0))
    key, mask_key = (
        LatentCache(root / "cache", "vae").key(example, draw, WHITE),
        LatentCache(root / "cache", "vae").mask_key(example, draw),
    )
    assert mask_key != key and mask_key.endswith("-mask")
    flipped = LatentCache(root / "cache", "vae").mask_key(example, PlannedImage(0, draw.crop, True, ""))
    assert flipped != mask_key
    edited = mask.copy()
    edited[0, 0] ^= 1
    save(root / "masks" / "wide.png", edited)
    assert LatentCache(root / "cache", "vae").key(example, draw, WHITE) == key  # the image is not encoded again
    assert LatentCache(root / "cache", "vae").mask_key(example, draw) not in (mask_key, None)
    unmasked = plan_examples(masked_scan(root / "data", None, masked_loss=False), SPEC_64)[0]
    assert LatentCache(root / "cache", "vae").mask_key(unmasked, draw) is None


# --- the training step and the memory estimate -----------------------------------------------------------------


def test_the_step_weighs_its_loss_by_the_batch_mask_and_the_estimate_builds_one():
    config = from_dict(
        {
            "model": {"path": "builtin:tiny-sdxl"},
            "dataset": {
                "path": "unused",
                "resolution": 64,
                "min_bucket_side": 64,
                "masked_loss": True,
                "unmasked_weight": 0.5,
            },
            "network": {"kind": "dora", "rank": 2},
            "training": {"batch_size": 2, "mixed_precision": "no"},
            "sampling": {"prompts": []},
        }
    )
    run = SimulatedRun(config, ARCHITECTURE, (64, 64))
    batch, noise, session = run._step_inputs()
    assert batch.mask.shape == (2, 1, 8, 8)
    batch.moments = torch.randn(batch.moments.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        whole = training_loss(session, run.pipe.unet, batch, noise, nullcontext)
        batch.mask = None
        assert torch.equal(training_loss(session, run.pipe.unet, batch, noise, nullcontext), whole)
        batch.mask = torch.zeros(2, 1, 8, 8)  # all black: unmasked_weight 0.5 everywhere
        torch.testing.assert_close(training_loss(session, run.pipe.unet, batch, noise, nullcontext), whole * 0.5)
