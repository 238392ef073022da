"""Saving a run's adapters: the kohya file front ends load, with metadata from the run's settings and data, and
the moving average of the adapter beside it when the run keeps one."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path

from trainer.adapters.injection import adapter_weights
from trainer.adapters.low_rank import truncate_rank
from trainer.adapters.weights import AdapterWeights
from trainer.config.schema import NetworkSettings, TrainConfig
from trainer.files import file_sha256
from trainer.kohya.adapter_file import DTYPES, save_adapter
from trainer.kohya.metadata import EMA_KEY, EXPORT_RANK_KEY, THUMBNAIL_KEY, build_metadata, thumbnail_data_uri
from trainer.runs.run_directory import RunDirectory

from .ema import AdapterEMA
from .network import Adapters


def vera_record(adapters: Adapters, net: NetworkSettings) -> dict:
    """What a VeRA / DVoRA file records so its shared projections can be rebuilt and checked, per part."""
    projections = {
        part: next(iter(layers.values())).vera_projections.describe() for part, layers in adapters.items() if layers
    }
    return {"kind": net.kind, "d_initial": net.vera_d_initial, "projections": projections}


def cut_to_export_rank(adapters: Adapters, rank: int) -> tuple[dict[str, AdapterWeights], dict | None]:
    """Every layer's file weights, cut to ``rank`` by SVD when it is set (``saving.export_rank``), and what the
    cut cost: the largest and the mean error relative to each layer's trained update (``truncate_rank``)."""
    weights = {stem: w for layers in adapters.values() for stem, w in adapter_weights(layers).items()}
    if not rank:
        return weights, None
    errors = []
    for stem, full in weights.items():
        weights[stem], error = truncate_rank(full, rank)
        if weights[stem] is not full:
            errors.append(error)
    record = {
        "rank": rank,
        "layers_cut": len(errors),
        "update_error_max": max(errors, default=0.0),
        "update_error_mean": sum(errors) / max(len(errors), 1),
    }
    return weights, record


def _file_rank(rank: int, alpha: float, export_rank: int) -> tuple[int, float]:
    """(rank, alpha) as the file has them: a cut (``saving.export_rank``) lowers a rank above its own and keeps
    alpha / rank."""
    if not export_rank or rank <= export_rank:
        return rank, alpha
    return export_rank, alpha / rank * export_rank


INIT_FROM_KEY = "dora_studio.init_from"


@functools.cache
def _init_from_record(path: str) -> dict[str, str]:
    """Which file the run started from, by name and content: the path alone may not exist where the file goes.
    Read once per run (the file is the run's starting point, not something it writes), not at every save."""
    return {"file": Path(path).name, "sha256": file_sha256(Path(path))}


def save_network(
    path: Path,
    adapters: Adapters,
    config: TrainConfig,
    *,
    steps: int,
    epoch: int,
    started_at: float,
    dataset_dirs: Mapping[str, Mapping[str, int]],
    tag_frequencies: Mapping[str, Mapping[str, int]],
    reg_dataset_dirs: Mapping[str, Mapping[str, int]] | None = None,
    thumbnail: Path | None = None,
    ema: AdapterEMA | None = None,
) -> None:
    """Write every adapter of the run to ``path`` with kohya's metadata (docs/adapter-format.md), atomically.

    ``dataset_dirs``, ``reg_dataset_dirs`` and ``tag_frequencies`` are kohya's ``ss_dataset_dirs``,
    ``ss_reg_dataset_dirs`` and ``ss_tag_frequency`` (``data.scan.DatasetScan.folder_counts`` and
    ``tag_frequency``). A run started from a file (``network.init_from``) records its name and SHA-256.
    ``thumbnail``: a sample image, embedded as ModelSpec's thumbnail (``saving.thumbnail``). ``ema``: the run's
    moving average, written the same way beside ``path`` (``RunDirectory.ema_twin``), recording how it averaged.
    """
    net, opt = config.network, config.optimizer
    export_rank = config.saving.export_rank
    rank, alpha = _file_rank(net.rank, net.alpha, export_rank)
    conv_rank, conv_alpha = _file_rank(net.conv_rank, net.conv_alpha, export_rank)
    has_conv = net.unet_targets == "attn+conv"
    metadata = build_metadata(
        network_kind="dora" if net.has_magnitude else "lora",
        dim=rank,
        alpha=alpha,
        conv_dim=conv_rank if has_conv else None,
        conv_alpha=conv_alpha if has_conv else None,
        dora_axis=net.dora_axis if net.has_magnitude else None,
        output_name=config.saving.output_name,
        base_model_name=Path(config.model.path).name,
        steps=steps,
        epoch=epoch,
        started_at=started_at,
        finished_at=time.time(),
        mixed_precision=config.training.mixed_precision,
        learning_rate=opt.learning_rate,
        unet_lr=opt.unet_lr or opt.learning_rate,
        text_encoder_lr=(opt.text_encoder_1_lr or opt.learning_rate) if net.train_text_encoders else None,
        tag_frequency=tag_frequencies,
        dataset_dirs=dataset_dirs,
        resolution=(config.dataset.resolution, config.dataset.resolution),
        title=config.saving.output_name,
        prediction_type="v" if config.model.prediction_type == "v_prediction" else "epsilon",
        # Cut factors are no longer VeRA's scaled projections: the record would not check, the run's state resumes.
        vera=vera_record(adapters, net) if net.uses_projections and not export_rank else None,
        extra={
            "dora_studio.network": json.dumps(
                {"unet_targets": net.unet_targets, "include": net.include, "exclude": net.exclude}
            )
        }
        | ({"ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs)} if reg_dataset_dirs else {})
        | ({INIT_FROM_KEY: json.dumps(_init_from_record(net.init_from))} if net.init_from else {})
        | ({THUMBNAIL_KEY: thumbnail_data_uri(thumbnail)} if thumbnail else {}),
    )
    _save_weights(path, adapters, config, metadata)
    if ema is not None:
        with ema.swapped_in():
            _save_weights(RunDirectory.ema_twin(path), adapters, config, metadata | {EMA_KEY: json.dumps(ema.record())})


def _save_weights(path: Path, adapters: Adapters, config: TrainConfig, metadata: Mapping[str, str]) -> None:
    """The adapters' weights as they are now, cut to ``saving.export_rank`` with what the cut cost, under
    ``metadata``."""
    weights, cut = cut_to_export_rank(adapters, config.saving.export_rank)
    if cut:
        metadata = {
            **metadata,
            EXPORT_RANK_KEY: json.dumps(cut | {"trained_rank": config.network.rank, "kind": config.network.kind}),
        }
    save_adapter(path, weights, metadata, DTYPES[config.saving.save_dtype])
