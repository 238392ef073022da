"""VAE latents kept on disk, so each image is encoded once per crop, not once per step.

A cache entry holds the VAE's posterior moments (mean and log-variance), not one sample of it: training
draws a fresh sample from them each step, exactly as it would when encoding on the fly, so turning the
cache on or off does not change what is learned. Entries are keyed by the image's bytes, its crop, its
flip, the background transparency is put on, and the VAE (config and weights), so an edited image, another
bucket, another background colour or another VAE never reuses a stale latent, while a second run or a
resume on the same data reuses everything.

With masked loss, each crop's mask at the latent grid is an entry of its own beside the moments, keyed by the
mask file's bytes (or, for an alpha mask, the image's) and the same crop and flip: an edited mask is read again
without encoding the image again, and turning masked loss on or off leaves the moments' entries as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.errors import DatasetError
from trainer.files import atomic_path

from .epoch_plan import PlannedImage, TrainExample, load_mask, load_pixels

CACHE_FORMAT = 1  # bump when the entry layout changes, so old entries are never misread


def vae_fingerprint(vae: nn.Module, encode_dtype: torch.dtype) -> str:
    """A short hash of the VAE's config, weights and encoding dtype."""
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}  # not _name_or_path
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(encode_dtype).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sample_latents(moments: Tensor, scaling_factor: float, eps: Tensor | None = None) -> Tensor:
    """One draw from the posterior, scaled for the UNet; what ``latent_dist.sample()`` computes.

    ``eps`` is the standard normal draw (training passes its step's); None draws one here.
    """
    mean, logvar = moments.contiguous().chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    # randn(shape), not randn_like: the VAE may hand back channels-last moments, and randn_like would lay
    # the same random numbers out in another order, so cached and fresh latents would differ
    if eps is None:
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps.to(mean.dtype)) * scaling_factor


class LatentCache:
    def __init__(self, root: Path, vae_id: str):
        self.folder = Path(root) / f"v{CACHE_FORMAT}-{vae_id}"
        self._digests: dict[Path, str] = {}

    def key(self, example: TrainExample, planned: PlannedImage, background: tuple[int, int, int]) -> str:
        """Names everything that decides the pixels; the background matters for images with transparency."""
        red, green, blue = background
        return f"{self._digest(example.path)}-{_geometry(planned)}-b{red:02x}{green:02x}{blue:02x}"

    def mask_key(self, example: TrainExample, planned: PlannedImage) -> str | None:
        """The key of the image's mask at this crop; None when there is nothing to read (no masked loss, or
        no mask: all ones)."""
        source = example.mask
        if source is None or source.path is None:
            return None
        return f"{self._digest(source.path)}-{_geometry(planned)}-{'alpha' if source.alpha else 'mask'}"

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path][:32]

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str, name: str = "moments") -> Tensor | None:
        """The cached tensor (moments, or a mask), or None when absent or unreadable (then it is made again)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)[name]
        except Exception:  # a damaged entry (e.g. a disk that filled up elsewhere) costs one re-encode
            return None

    def has(self, key: str, name: str = "moments") -> bool:
        """Whether a readable entry exists; reads only the header, so checking every entry is cheap."""
        try:
            with safe_open(self.path_for(key), "pt") as entry:
                return name in entry.keys()
        except (OSError, SafetensorError):  # absent, cut short or not safetensors: encode it again
            return False

    def store(self, key: str, tensor: Tensor, name: str = "moments") -> None:
        with atomic_path(self.path_for(key)) as tmp:
            save_file({name: tensor.detach().to("cpu", torch.float32).contiguous()}, str(tmp))


def _geometry(planned: PlannedImage) -> str:
    """The crop and flip, the same for an image's moments and its mask."""
    (top, left), (width, height) = planned.crop.crop_top_left, planned.crop.bucket
    resized_width, resized_height = planned.crop.resized_size
    flip = "f" if planned.flipped else "n"
    return f"{width}x{height}-r{resized_width}x{resized_height}-c{top}_{left}-{flip}"


@torch.no_grad()
def encode_moments(vae: nn.Module, pixels: Tensor) -> Tensor:
    """[B, 2C, h, w] posterior moments of [B, 3, H, W] pixels in [-1, 1]."""
    return vae.encode(pixels).latent_dist.parameters


@dataclass
class FillResult:
    encoded: int  # entries encoded now (the rest were cached already)
    unreadable: dict[Path, str]  # images that failed to load, with the reason (they are left out)


def fill_cache(
    cache: LatentCache,
    examples: list[TrainExample],
    planned: Iterable[PlannedImage],
    vae: nn.Module,
    background: tuple[int, int, int],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> FillResult:
    """Encode every planned image not yet cached (or cached but unreadable), one image at a time (buckets differ),
    and store the masks of those with masked loss.

    An image or mask that passed the dataset scan but fails to load now (damage the header check cannot see) is
    reported rather than ending the run: caching happens before training, so it can simply be left out.
    """
    pending: dict[str, PlannedImage] = {}
    masks: dict[str, PlannedImage] = {}
    for item in planned:
        key = cache.key(examples[item.example], item, background)
        if key not in pending and not cache.has(key):
            pending[key] = item
        mask_key = cache.mask_key(examples[item.example], item)
        if mask_key is not None and mask_key not in masks and not cache.has(mask_key, "mask"):
            masks[mask_key] = item
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    result = FillResult(0, {})
    for done, (key, item) in enumerate(pending.items(), start=1):
        example = examples[item.example]
        if example.path in result.unreadable:
            continue
        try:
            pixels = load_pixels(example, item, background)[None].to(device, dtype)
        except DatasetError as error:
            result.unreadable[example.path] = str(error)
            continue
        cache.store(key, encode_moments(vae, pixels)[0])
        result.encoded += 1
        on_progress(done, len(pending))
    for key, item in masks.items():
        example = examples[item.example]
        if example.path in result.unreadable:
            continue
        try:
            cache.store(key, load_mask(example, item), "mask")
        except DatasetError as error:
            result.unreadable[example.path] = str(error)
    return result
