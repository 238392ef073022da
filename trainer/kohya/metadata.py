"""The metadata of an adapter file: kohya's ``ss_*`` keys and ModelSpec (docs/adapter-format.md, section 5).

Front ends and model sites show these keys; LyCORIS and kohya read the DoRA axis from ``ss_network_args``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from PIL import Image

from trainer.adapters.dora_norm import DORA_AXES, DoraAxis

VERA_KEY = "dora_studio.vera"  # a VeRA / DVoRA file's record (build_metadata's ``vera``)
# A file saved below its trained rank (saving.export_rank): the rank it was cut to and what the cut cost.
EXPORT_RANK_KEY = "dora_studio.export_rank"
EMA_KEY = "dora_studio.ema"  # a moving average of the trained adapter (training.ema_decay): its decay and cadence
# ModelSpec's preview image, a data URI: AUTOMATIC1111 pops it from the metadata it shows, SwarmUI shows it and
# ignores a value that does not start with "data:image/".
THUMBNAIL_KEY = "modelspec.thumbnail"
THUMBNAIL_SIDE, THUMBNAIL_QUALITY = 256, 85  # a 256 px JPEG: typically 5-20 KB of a header loaders read whole


def build_metadata(
    *,
    network_kind: Literal["lora", "dora"],
    dim: int,
    alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
    dora_axis: DoraAxis | None,
    output_name: str,
    base_model_name: str,
    steps: int,
    epoch: int,
    started_at: float,
    finished_at: float,
    mixed_precision: str,
    learning_rate: float,
    unet_lr: float | None,
    text_encoder_lr: float | None,
    tag_frequency: Mapping[str, Mapping[str, int]],
    dataset_dirs: Mapping[str, Mapping[str, int]],
    resolution: tuple[int, int],
    title: str,
    prediction_type: Literal["epsilon", "v"] = "epsilon",
    vera: Mapping[str, object] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + ModelSpec metadata (docs/adapter-format.md section 5); timestamps are Unix seconds.

    The DoRA axis goes in twice: ``wd_on_output`` in ``ss_network_args`` (what LyCORIS/kohya read)
    and ``dora_studio.dora_axis``, because no loader infers it reliably from shapes alone. ``vera``: a VeRA or
    DVoRA file's record (kind, d_initial, and per part the shared projections' seed, sizes and digest), kept
    as JSON under ``dora_studio.vera``; the tensors are a plain LoRA or DoRA file's.
    """
    if (network_kind == "dora") != (dora_axis is not None) or (dora_axis is not None and dora_axis not in DORA_AXES):
        raise ValueError(f"network_kind {network_kind!r} needs dora_axis in {DORA_AXES} for DoRA, None for LoRA")
    if (conv_dim is None) != (conv_alpha is None):
        raise ValueError("conv_dim and conv_alpha go together")
    conv_args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)} if conv_dim is not None else {}
    width, height = resolution
    kind = network_kind_keys(dora_axis, conv_args)
    metadata = {
        "ss_network_module": kind.pop("ss_network_module"),
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": kind.pop("ss_network_args"),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model_name,
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_mixed_precision": mixed_precision,
        "ss_learning_rate": str(learning_rate),
        "ss_unet_lr": str(unet_lr),
        "ss_text_encoder_lr": str(text_encoder_lr),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_resolution": str((width, height)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(finished_at, UTC).isoformat(timespec="seconds"),
        "modelspec.prediction_type": prediction_type,
    }
    metadata |= kind  # dora_studio.dora_axis, for DoRA
    if vera is not None:
        metadata[VERA_KEY] = json.dumps(vera, sort_keys=True)
    return metadata | dict(extra or {})


def network_kind_keys(dora_axis: DoraAxis | None, network_args: Mapping[str, str] | None = None) -> dict[str, str]:
    """The keys that say what kind of network a file holds: ``ss_network_module``, ``ss_network_args`` (LyCORIS's
    ``dora_wd`` and ``wd_on_output`` for DoRA, then the other ``network_args`` given, e.g. conv_dim) and, for
    DoRA, ``dora_studio.dora_axis``. Shared by training's metadata and ``dora-studio convert``."""
    kept = {k: v for k, v in (network_args or {}).items() if k not in ("algo", "dora_wd", "wd_on_output")}
    if dora_axis is not None:
        kept = {"algo": "lora", "dora_wd": "True", "wd_on_output": str(dora_axis == "output"), **kept}
    keys = {"ss_network_module": "lycoris.kohya" if dora_axis else "networks.lora", "ss_network_args": json.dumps(kept)}
    return keys | ({"dora_studio.dora_axis": dora_axis} if dora_axis is not None else {})


def thumbnail_data_uri(image_path: Path) -> str:
    """``image_path`` as ModelSpec's thumbnail: a JPEG data URI, shrunk to THUMBNAIL_SIDE on its long side."""
    with Image.open(image_path) as image:
        thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)  # never enlarges
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def describe_thumbnail(value: str) -> str:
    """A thumbnail's kind, size and bytes (``JPEG 256x171, 14.2 KB``), or why it is no image: what ``inspect``
    prints instead of the base64."""
    header, _, data = value.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        return f"not a base64 image data URI (starts {value[:24]!r})"
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return f"{image.format} {image.width}x{image.height}, {len(raw) / 1024:.1f} KB"
    except (binascii.Error, OSError) as error:  # bad base64; bytes no image reader knows
        return f"unreadable image ({error})"


def derived_metadata(source: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """What a file made from another (resize, convert) keeps of its metadata, and what its record should add: the
    hashes go (``save_adapter`` writes the new one) and so does a VeRA record, whose projections the new factors
    are no longer scaled rows of; the record then says ``dropped``."""
    kept = {k: v for k, v in source.items() if k not in ("sshs_model_hash", "sshs_legacy_hash", VERA_KEY)}
    return kept, ({"dropped": VERA_KEY} if VERA_KEY in source else {})
