"""What each training step sees: epoch order, crops, flips, captions, pixels, cached latents, batches.

Expected values come from hand arithmetic (crop offsets, [-1, 1] pixel values), numpy slicing of the saved
image, diffusers' own VAE posterior, and kohya's step count in ``trainer.data.check``.
"""

import copy
import dataclasses
import random
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from trainer.builtin.tiny import TINY_VAE_CONFIG
from trainer.data.batches import EpochBatches, batch_loader
from trainer.data.buckets import BucketSpec, CropPlan
from trainer.data.captions import CaptionOptions
from trainer.data.check import report_for_scan, steps_per_epoch
from trainer.data.epoch_plan import (
    AugmentOptions,
    PlannedImage,
    TrainExample,
    epoch_batches,
    load_pixels,
    plan_epoch,
    plan_examples,
    plan_image,
)
from trainer.data.latent_cache import LatentCache, fill_cache, sample_latents, vae_fingerprint
from trainer.data.scan import scan_dataset

# Buckets of at most 128x128 px: (64, 192), (64, 256), (128, 128), (192, 64), (256, 64).
SPEC = BucketSpec(resolution=128, min_side=64, max_side=256, step=64)
# One 64x64 bucket: small enough for the tiny VAE to encode in milliseconds.
SPEC_64 = BucketSpec(resolution=64, min_side=64, max_side=128, step=64)
WHITE = (255, 255, 255)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny convolutions run faster on one thread


def save(path: Path, pixels: np.ndarray, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def solid(width: int, height: int, colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, len(colour))).copy()


def gradient(width: int, height: int) -> np.ndarray:
    """Every column and row different, so any crop or mirror mistake changes the pixels."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, (rows * 2) % 256, (cols * 7 + rows * 3) % 256], axis=-1)


def expected_pixels(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] in [-1, 1], computed in float64."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).permute(2, 0, 1) / 127.5 - 1.0


def example(path: Path, size: tuple[int, int], bucket: tuple[int, int], caption: str = "", repeats: int = 1):
    return TrainExample(Path(path), caption, repeats, size, bucket)


def options(**overrides) -> AugmentOptions:
    return AugmentOptions(**{"bucket_spec": SPEC, **overrides})


def with_options(examples: list[TrainExample], **subset_options) -> list[TrainExample]:
    """The examples as a subset with these caption/flip options would give them."""
    return [dataclasses.replace(e, **subset_options) for e in examples]


# --- the epoch's order -------------------------------------------------------------------------------------


@contextmanager
def other_global_rng_states():
    """Python's and torch's global RNGs moved elsewhere, and put back afterwards."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(999)
        torch.manual_seed(999)
        yield
    random.setstate(state)


def synthetic_examples() -> list[TrainExample]:
    """Three buckets, mixed repeats; epoch_batches never opens the files."""
    layout = [
        ((128, 128), 3),
        ((128, 128), 1),
        ((128, 128), 2),
        ((192, 64), 4),
        ((192, 64), 1),
        ((64, 192), 2),
        ((128, 128), 1),
    ]
    return [example(f"img{i}.png", bucket, bucket, repeats=repeats) for i, (bucket, repeats) in enumerate(layout)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 50])
def test_each_image_comes_repeats_times_and_batches_never_mix_buckets(batch_size):
    examples = synthetic_examples()
    for epoch in range(4):
        batches = epoch_batches(examples, batch_size, seed=42, epoch=epoch)
        seen = Counter(index for batch in batches for index in batch)
        assert seen == {i: e.repeats for i, e in enumerate(examples)}
        short_batches = Counter()
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            assert len({examples[i].bucket for i in batch}) == 1
            if len(batch) < batch_size:
                short_batches[examples[batch[0]].bucket] += 1
        assert all(count == 1 for count in short_batches.values())  # only a bucket's last batch is short
        per_bucket = Counter()
        for e in examples:
            per_bucket[e.bucket] += e.repeats
        assert len(batches) == steps_per_epoch(per_bucket, batch_size)
        assert len(batches) == sum(-(-count // batch_size) for count in per_bucket.values())


def test_order_is_a_pure_function_of_seed_and_epoch():
    examples = synthetic_examples()
    first = epoch_batches(examples, 2, seed=7, epoch=3)
    with other_global_rng_states():
        assert epoch_batches(examples, 2, seed=7, epoch=3) == first
    assert epoch_batches(examples, 2, seed=7, epoch=4) != first
    assert epoch_batches(examples, 2, seed=8, epoch=3) != first


def test_batches_are_shuffled_across_buckets_and_images_within_them():
    examples = synthetic_examples()
    first_buckets = {examples[epoch_batches(examples, 2, 1, e)[0][0]].bucket for e in range(12)}
    assert len(first_buckets) > 1  # buckets are not served in a fixed order
    # with batches larger than any bucket, each batch is one whole bucket in its shuffled order
    square_orders = {
        tuple(next(batch for batch in epoch_batches(examples, 50, 1, e) if examples[batch[0]].bucket == (128, 128)))
        for e in range(6)
    }
    assert len(square_orders) > 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five images in two repeat folders, sized to land in three of SPEC's buckets."""
    root = tmp_path_factory.mktemp("dataset")
    save(root / "3_chars" / "square.png", solid(128, 128, (255, 0, 51)), "red square")
    save(root / "3_chars" / "wide.png", gradient(192, 128), "gradient, wide")
    save(root / "3_chars" / "tall.png", gradient(64, 192), "tall thing")
    save(root / "1_misc" / "strip.png", gradient(192, 64), "strip")
    save(root / "1_misc" / "large.png", gradient(300, 200), "large")
    return root


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_batch_count_matches_check_data(dataset, batch_size):
    scan = scan_dataset(dataset)
    examples = plan_examples(scan, SPEC)
    report = report_for_scan(scan, SPEC, batch_size)
    by_name = {e.path.name: e for e in examples}
    assert by_name["wide.png"].bucket == by_name["large.png"].bucket == (128, 128)
    assert by_name["tall.png"].bucket == (64, 192) and by_name["strip.png"].bucket == (192, 64)
    assert by_name["large.png"].size == (300, 200) and by_name["wide.png"].repeats == 3
    assert report.bucket_counts == {(64, 192): 3, (128, 128): 7, (192, 64): 1}
    for epoch in range(3):
        assert len(epoch_batches(examples, batch_size, seed=0, epoch=epoch)) == report.steps_per_epoch
        flipping = with_options(examples, flip=True)
        assert len(plan_epoch(flipping, options(), batch_size, 0, epoch)) == report.steps_per_epoch


def test_plan_replays_exactly_on_resume(dataset):
    examples = with_options(
        plan_examples(scan_dataset(dataset), SPEC),
        flip=True,
        captions=CaptionOptions(trigger_word="zqx", shuffle_tags=True, tag_dropout=0.3),
    )
    augment = options(random_crop=True)
    uninterrupted = plan_epoch(examples, augment, 2, seed=5, epoch=1)
    with other_global_rng_states():  # as a resumed process would have
        resumed = plan_epoch(examples, augment, 2, seed=5, epoch=1)
    for k in range(len(uninterrupted)):
        assert resumed[k:] == uninterrupted[k:]
    draws = [draw for batch in uninterrupted for draw in batch]
    assert {d.flipped for d in draws} == {True, False}  # the plan really is random...
    assert len({d.crop.crop_top_left for d in draws if examples[d.example].path.name == "wide.png"}) > 1
    assert plan_epoch(examples, augment, 2, seed=5, epoch=2) != uninterrupted  # ...and differs per epoch
    for batch, order in zip(uninterrupted, epoch_batches(examples, 2, 5, 1)):
        assert [d.example for d in batch] == order


# --- crops, flips and SDXL's size conditioning ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "time_ids", "resized"),
    [
        # 192x128 into the 128x128 bucket: heights match, 64 px spare width, centre crop starts at x=32
        ((192, 128), [128, 192, 0, 32, 128, 128], (192, 128)),
        # 128x192: widths match, 64 px spare height, crop starts at y=32
        ((128, 192), [192, 128, 32, 0, 128, 128], (128, 192)),
        # 300x200 shrinks to 192x128 (300 * 128 / 200), the original size is still what SDXL is told
        ((300, 200), [200, 300, 0, 32, 128, 128], (192, 128)),
        # 190x128: 62 px spare, centre crop at 31
        ((190, 128), [128, 190, 0, 31, 128, 128], (190, 128)),
    ],
)
def test_time_ids_of_a_centre_crop_by_hand(size, time_ids, resized):
    image = example("unused.png", size, (128, 128))
    draw = plan_image(image, 0, options(), random.Random(0))
    assert draw.crop.resized_size == resized
    assert draw.time_ids(image) == time_ids
    flipped = PlannedImage(0, draw.crop, True, "")
    left = time_ids[3]
    assert flipped.time_ids(image)[3] == resized[0] - 128 - left  # mirrored; equal to left for a centred crop
    assert flipped.time_ids(image)[:3] + flipped.time_ids(image)[4:] == time_ids[:3] + time_ids[4:]


def test_flipped_draw_reports_the_crop_of_the_flipped_image(tmp_path):
    """diffusers' SDXL training script flips first and reports the crop in the flipped image; ours crops
    first and flips after, so its time_ids must name the crop that gives the same pixels that way."""
    array = gradient(192, 128)
    image = example(save(tmp_path / "wide.png", array), (192, 128), (128, 128))
    crop = CropPlan((128, 128), (192, 128), (0, 10))  # an off-centre crop, so the mirror moves it
    plain, flipped = PlannedImage(0, crop, False, ""), PlannedImage(0, crop, True, "")
    assert plain.time_ids(image) == [128, 192, 0, 10, 128, 128]
    assert flipped.time_ids(image) == [128, 192, 0, 54, 128, 128]  # 192 - 128 - 10
    top, left = flipped.time_ids(image)[2:4]
    flipped_first = np.ascontiguousarray(array[:, ::-1])[top : top + 128, left : left + 128]
    pixels = load_pixels(image, flipped, WHITE)
    torch.testing.assert_close(pixels.double(), expected_pixels(flipped_first), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels, load_pixels(image, plain, WHITE).flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(
        load_pixels(image, plain, WHITE).double(), expected_pixels(array[:, 10:138]), rtol=0, atol=1e-6
    )


def test_random_crops_stay_inside_and_flip_about_half_the_time():
    image = dataclasses.replace(example("unused.png", (300, 200), (128, 128)), flip=True)
    augment = options(random_crop=True)
    draws = [plan_image(image, 0, augment, random.Random(seed)) for seed in range(200)]
    lefts = {d.crop.crop_top_left[1] for d in draws}
    assert lefts <= set(range(192 - 128 + 1)) and len(lefts) > 10
    assert all(d.crop.crop_top_left[0] == 0 and d.crop.resized_size == (192, 128) for d in draws)
    assert 60 < sum(d.flipped for d in draws) < 140
    for d in draws:
        assert 0 <= d.time_ids(image)[3] <= 64


# --- pixels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(128, 128), (300, 200)])
def test_solid_colour_gives_exact_values(tmp_path, size):
    image = example(save(tmp_path / "solid.png", solid(*size, (255, 0, 51))), size, (128, 128))
    draw = plan_image(dataclasses.replace(image, flip=True), 0, options(), random.Random(0))
    pixels = load_pixels(image, draw, WHITE)
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32
    for channel, value in enumerate((1.0, -1.0, 51 / 127.5 - 1.0)):
        torch.testing.assert_close(
            pixels[channel].double(), torch.full((128, 128), value, dtype=torch.float64), rtol=0, atol=1e-6
        )


def test_transparent_pixels_are_composited_on_the_background(tmp_path):
    rgba = np.zeros((128, 128, 4), dtype=np.uint8)
    rgba[:, :64] = (0, 255, 0, 0)  # fully transparent: only the background shows
    rgba[:, 64:96] = (200, 100, 0, 255)  # opaque: only the colour
    rgba[:, 96:] = (200, 100, 0, 102)  # 40 % opaque
    image = example(save(tmp_path / "alpha.png", rgba), (128, 128), (128, 128))
    background = (10, 20, 30)
    pixels = load_pixels(image, plan_image(image, 0, options(), random.Random(0)), background).double()
    blend = [(c * 102 + b * (255 - 102)) / 255 for c, b in zip((200, 100, 0), background)]
    for channel in range(3):
        torch.testing.assert_close(
            pixels[channel, :, :64],
            torch.full((128, 64), background[channel] / 127.5 - 1, dtype=torch.float64),
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            pixels[channel, :, 64:96],
            torch.full((128, 32), (200, 100, 0)[channel] / 127.5 - 1, dtype=torch.float64),
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            pixels[channel, :, 96:],
            torch.full((128, 32), blend[channel] / 127.5 - 1, dtype=torch.float64),
            rtol=0,
            atol=1.01 / 127.5,
        )
    white = load_pixels(image, plan_image(image, 0, options(), random.Random(0)), WHITE)
    torch.testing.assert_close(white[:, :, :64], torch.ones(3, 128, 64), rtol=0, atol=0)


# --- captions -------------------------------------------------------------------------------------------------


def test_caption_options_apply_through_draw_for():
    image = example("unused.png", (128, 128), (128, 128), caption="red cube, table, studio light")
    plain = plan_image(
        with_options([image], captions=CaptionOptions(trigger_word="zqx"))[0], 0, options(), random.Random(0)
    )
    assert plain.caption == "zqx, red cube, table, studio light"
    [shuffled] = with_options([image], captions=CaptionOptions(trigger_word="zqx", shuffle_tags=True, keep_tokens=1))
    captions = {plan_image(shuffled, 0, options(), random.Random(seed)).caption for seed in range(30)}
    assert len(captions) > 1
    for caption in captions:
        tags = caption.split(", ")
        assert tags[0] == "zqx" and sorted(tags[1:]) == ["red cube", "studio light", "table"]
    [dropped] = with_options([image], captions=CaptionOptions(trigger_word="zqx", caption_dropout=1.0))
    assert plan_image(dropped, 0, options(), random.Random(0)).caption == ""
    same = [plan_image(shuffled, 3, options(), random.Random(9)) for _ in range(2)]
    assert same[0] == same[1] and same[0].example == 3


# --- the latent cache -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**copy.deepcopy(TINY_VAE_CONFIG)).eval()


@pytest.fixture
def small_dataset(tmp_path) -> list[TrainExample]:
    """Three images for the single 64x64 bucket; one wider (cropped off-centre by half a pixel), one transparent."""
    rgba = np.concatenate([gradient(64, 64), np.full((64, 64, 1), 255)], axis=-1)
    rgba[:32, :, 3] = 0
    paths = [
        save(tmp_path / "a.png", gradient(64, 64)),
        save(tmp_path / "b.png", gradient(97, 64)),
        save(tmp_path / "c.png", rgba),
    ]
    sizes = [(64, 64), (97, 64), (64, 64)]  # 33 px spare: the mirrored crop starts at 17, not 16
    return [TrainExample(p, f"caption {p.stem}, tag", 2, s, (64, 64)) for p, s in zip(paths, sizes)]


def every_crop(examples: list[TrainExample]) -> list[PlannedImage]:
    augment = options(bucket_spec=SPEC_64)
    draws = []
    for index, e in enumerate(examples):
        crop = plan_image(e, index, augment, random.Random(0)).crop
        draws += [PlannedImage(index, crop, False, ""), PlannedImage(index, crop, True, "")]
    return draws


def test_cache_key_follows_bytes_crop_flip_and_background(tmp_path):
    path = save(tmp_path / "img.png", gradient(192, 128))
    image = example(path, (192, 128), (128, 128))
    crop = CropPlan((128, 128), (192, 128), (0, 32))
    draw = PlannedImage(0, crop, False, "a caption")
    key = LatentCache(tmp_path / "cache", "vae1").key(image, draw, WHITE)
    assert LatentCache(tmp_path / "cache", "vae1").key(image, draw, WHITE) == key  # stable across runs
    # not otherwise: another caption, another place for the same bytes, another example index
    assert LatentCache(tmp_path / "cache", "vae1").key(image, PlannedImage(5, crop, False, "other"), WHITE) == key
    copy_path = tmp_path / "elsewhere" / "copy.png"
    copy_path.parent.mkdir()
    shutil.copy(path, copy_path)
    assert LatentCache(tmp_path / "cache", "vae1").key(example(copy_path, (192, 128), (128, 128)), draw, WHITE) == key
    # another VAE: same key, another folder
    other_vae = LatentCache(tmp_path / "cache", "vae2")
    assert other_vae.key(image, draw, WHITE) == key
    assert other_vae.path_for(key) != LatentCache(tmp_path / "cache", "vae1").path_for(key)
    # everything that changes the pixels changes the key
    changed = {
        LatentCache(tmp_path / "cache", "vae1").key(image, PlannedImage(0, crop, True, "a caption"), WHITE),
        LatentCache(tmp_path / "cache", "vae1").key(
            image, PlannedImage(0, CropPlan((128, 128), (192, 128), (0, 31)), False, ""), WHITE
        ),
        LatentCache(tmp_path / "cache", "vae1").key(
            image, PlannedImage(0, CropPlan((64, 64), (96, 64), (0, 16)), False, ""), WHITE
        ),
        LatentCache(tmp_path / "cache", "vae1").key(image, draw, (0, 0, 0)),  # transparent parts differ
    }
    edited = gradient(192, 128)
    edited[5, 7] = (1, 2, 3)
    save(path, edited)
    changed.add(LatentCache(tmp_path / "cache", "vae1").key(image, draw, WHITE))
    assert key not in changed and len(changed) == 5


def test_fill_cache_encodes_missing_entries_once(tmp_path, small_dataset, vae):
    examples = small_dataset
    draws = every_crop(examples)
    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae, torch.float32))
    progress = []
    assert fill_cache(cache, examples, draws + draws[:2], vae, WHITE, lambda *p: progress.append(p)).encoded == 6
    assert progress[-1] == (6, 6) and len(progress) == 6
    assert fill_cache(cache, examples, draws, vae, WHITE).encoded == 0
    for draw in draws:
        pixels = load_pixels(examples[draw.example], draw, WHITE)[None]
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist
        moments = cache.load(cache.key(examples[draw.example], draw, WHITE))
        assert moments.shape == (8, 8, 8) and moments.dtype == torch.float32
        torch.testing.assert_close(moments[:4], expected.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moments[4:], expected.logvar[0], rtol=1e-5, atol=1e-5)
    flipped = [cache.load(cache.key(examples[d.example], d, WHITE)) for d in draws[:2]]
    assert not torch.allclose(flipped[0], flipped[1])
    # another background: every entry is keyed anew, and only the transparent image's latents change
    assert fill_cache(cache, examples, draws, vae, (0, 0, 0)).encoded == 6
    for draw in draws:
        white, black = (cache.load(cache.key(examples[draw.example], draw, bg)) for bg in (WHITE, (0, 0, 0)))
        assert torch.equal(white, black) == (examples[draw.example].path.name != "c.png")


def test_damaged_entry_loads_as_none_and_is_encoded_again(tmp_path, small_dataset, vae):
    examples = small_dataset
    draws = every_crop(examples)[:2]
    cache = LatentCache(tmp_path / "cache", "tiny")
    assert cache.load("no-such-key") is None
    fill_cache(cache, examples, draws, vae, WHITE)
    key = cache.key(examples[0], draws[0], WHITE)
    good = cache.load(key).clone()  # load_file maps the file: overwriting it in place would change the tensor
    raw = cache.path_for(key).read_bytes()
    cache.path_for(key).write_bytes(raw[: len(raw) // 2])  # cut short
    assert cache.load(key) is None
    cache.path_for(key).write_bytes(b"not a safetensors file")
    assert cache.load(key) is None
    assert fill_cache(cache, examples, draws, vae, WHITE).encoded == 1
    torch.testing.assert_close(cache.load(key), good, rtol=0, atol=0)


def test_vae_fingerprint_ignores_where_the_vae_came_from(tmp_path, vae):
    vae.save_pretrained(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    first = AutoencoderKL.from_pretrained(tmp_path / "one")
    second = AutoencoderKL.from_pretrained(tmp_path / "two")
    assert first.config._name_or_path != second.config._name_or_path
    assert (
        vae_fingerprint(first, torch.float32)
        == vae_fingerprint(second, torch.float32)
        == vae_fingerprint(vae, torch.float32)
    )
    assert vae_fingerprint(first, torch.float16) != vae_fingerprint(first, torch.float32)
    with torch.no_grad():
        next(iter(second.decoder.parameters())).view(-1)[0] += 1e-3  # a decoder weight counts too: it is the VAE
    assert vae_fingerprint(second, torch.float32) != vae_fingerprint(first, torch.float32)
    first.register_to_config(scaling_factor=0.18215)
    assert vae_fingerprint(first, torch.float32) != vae_fingerprint(vae, torch.float32)


def test_sample_latents_is_the_posterior_sample():
    moments = torch.randn(2, 8, 5, 6)
    moments[0, 4, 0, 0], moments[1, 5, 1, 1] = 35.0, -45.0  # outside diffusers' log-variance clamp
    scaling = 0.13025
    torch.manual_seed(4)
    ours = sample_latents(moments, scaling)
    torch.manual_seed(4)
    theirs = DiagonalGaussianDistribution(moments).sample() * scaling
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.manual_seed(4)
    eps = torch.randn(2, 4, 5, 6)
    by_hand = (moments[:, :4] + torch.exp(0.5 * moments[:, 4:].clamp(-30, 20)) * eps) * scaling
    torch.testing.assert_close(ours, by_hand, rtol=1e-6, atol=1e-6)
    torch.manual_seed(4)
    channels_last = sample_latents(moments.to(memory_format=torch.channels_last), scaling)
    torch.testing.assert_close(channels_last, ours, rtol=0, atol=0)


# --- batches --------------------------------------------------------------------------------------------------


def assert_same_batch(a, b, fields=("pixels", "moments")):
    assert a.captions == b.captions
    assert torch.equal(a.time_ids, b.time_ids)
    for field in fields:
        left, right = getattr(a, field), getattr(b, field)
        assert (left is None) == (right is None)
        if left is not None:
            assert torch.equal(left, right)


def test_batches_from_the_cache_match_batches_from_pixels(tmp_path, small_dataset, vae):
    examples = with_options(small_dataset, flip=True, captions=CaptionOptions(trigger_word="zqx"))
    augment = options(bucket_spec=SPEC_64)
    plan = plan_epoch(examples, augment, batch_size=2, seed=3, epoch=0)
    cache = LatentCache(tmp_path / "cache", "tiny")
    fill_cache(cache, examples, [d for batch in plan for d in batch], vae, WHITE)
    from_cache = EpochBatches(plan, examples, cache, WHITE)
    from_pixels = EpochBatches(plan, examples, None, WHITE)
    assert len(from_cache) == len(from_pixels) == len(plan) == 3  # 6 images per epoch, one bucket
    for index, draws in enumerate(plan):
        cached, fresh = from_cache[index], from_pixels[index]
        assert cached.pixels is None and fresh.moments is None
        assert cached.captions == fresh.captions == [d.caption for d in draws]
        assert all(c.startswith("zqx, caption") for c in cached.captions)
        assert torch.equal(cached.time_ids, fresh.time_ids)
        expected_ids = torch.tensor([d.time_ids(examples[d.example]) for d in draws], dtype=torch.float32)
        assert torch.equal(cached.time_ids, expected_ids) and cached.time_ids.shape == (len(draws), 6)
        with torch.no_grad():
            encoded = vae.encode(fresh.pixels).latent_dist.parameters
        torch.testing.assert_close(cached.moments, encoded, rtol=1e-5, atol=1e-5)


def test_missing_cache_entry_during_training_is_an_error(tmp_path, small_dataset):
    plan = [[every_crop(small_dataset)[0]]]
    with pytest.raises(RuntimeError, match="resume"):
        EpochBatches(plan, small_dataset, LatentCache(tmp_path / "cache", "tiny"), WHITE)[0]


def test_batch_loader_resumes_mid_epoch_and_workers_change_nothing(small_dataset):
    examples = with_options(small_dataset, flip=True, captions=CaptionOptions(shuffle_tags=True, caption_dropout=0.2))
    augment = options(bucket_spec=SPEC_64)
    plan = plan_epoch(examples, augment, batch_size=1, seed=11, epoch=2)
    dataset = EpochBatches(plan, examples, None, WHITE)
    full = list(batch_loader(dataset, start=0, workers=0))
    assert len(full) == len(plan) == 6
    for a, draws in zip(full, plan):
        assert_same_batch(a, EpochBatches([draws], examples, None, WHITE)[0])
    for start in (1, 4, 6):
        resumed = list(batch_loader(dataset, start=start, workers=0))
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:]):
            assert_same_batch(a, b)
    with_workers = list(batch_loader(dataset, start=2, workers=2))
    assert len(with_workers) == 4
    for a, b in zip(with_workers, full[2:]):
        assert_same_batch(a, b)
