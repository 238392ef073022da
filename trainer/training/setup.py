"""Everything a run needs before its first step: data, models, adapters, caches, optimizer.

Kept apart from the loop (``trainer.training.loop``) so the loop reads top to bottom like nanoGPT's: what
is set up here is handed over in one ``Session``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from trainer.config.schema import TrainConfig
from trainer.data.captions import is_randomised, process_caption
from trainer.data.epoch_plan import (
    AugmentOptions,
    PlannedImage,
    TrainExample,
    centred_crop,
    epoch_batches,
    plan_examples,
)
from trainer.data.latent_cache import LatentCache, fill_cache, vae_fingerprint
from trainer.errors import DatasetError, TrainingError
from trainer.files import default_cache_dir
from trainer.sdxl.objective import training_noise_scheduler
from trainer.sdxl.text_encoding import encode_captions

from .dataset_config import check_configured, scan_configured, subset_folders
from .init_from import init_from_file
from .network import Adapters, compile_unet, inject_network, trainable_parameters
from .optimizers import run_optimizer
from .placement import load_pipeline, offload_cached, text_encoders_run_every_step
from .sample_prompts import SamplePrompt, parse_prompt_line, read_prompt_file

log = logging.getLogger("dora_studio")

MAX_PROBLEMS_LOGGED = 20


@dataclass
class Session:
    """What the loop works with; built once by ``prepare_session``."""

    config: TrainConfig
    device: torch.device
    pipe: object  # diffusers StableDiffusionXLPipeline holding the adapted models
    adapters: Adapters
    trainable: dict[str, torch.nn.Parameter]
    examples: list[TrainExample]
    validation_examples: list[TrainExample]  # held out: their loss is measured, never trained on
    augment: AugmentOptions
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches_per_epoch: int
    total_steps: int  # optimizer steps in the whole run
    sample_prompts: list[SamplePrompt]
    latent_cache: LatentCache | None = None
    text_cache: dict[str, tuple[Tensor, Tensor]] | None = None
    offloaded: tuple[str, ...] = ()  # pipeline components in CPU memory until sampling needs them
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_dataset_dirs
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_reg_dataset_dirs
    tag_frequencies: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_tag_frequency

    @property
    def trains_text_encoders(self) -> bool:
        return self.config.network.train_text_encoders


def augment_options(config: TrainConfig) -> AugmentOptions:
    d = config.dataset
    colour = tuple(int(d.background_colour[i : i + 2], 16) for i in (1, 3, 5))
    return AugmentOptions(bucket_spec=config.dataset.bucket_spec(), random_crop=d.random_crop, background=colour)


def captions_vary(config: TrainConfig) -> bool:
    """Whether any subset that trains changes its captions between steps (shuffle or dropout), from the
    settings alone, so the text encoders' placement and the text cache are decided before any folder is
    scanned, and alike. Validation captions are fixed whatever their subset says (``plan_examples``)."""
    return any(is_randomised(folder.captions) for folder in subset_folders(config) if folder.role != "validation")


def sample_prompts(config: TrainConfig) -> list[SamplePrompt]:
    prompts = [parse_prompt_line(line) for line in config.sampling.prompts]
    if config.sampling.prompt_file:
        prompts += read_prompt_file(Path(config.sampling.prompt_file))
    return prompts


def total_optimizer_steps(batches_per_epoch: int, config: TrainConfig) -> int:
    """Optimizer steps in the run: an epoch's last accumulation group may be short, and max_steps may cut."""
    total = math.ceil(batches_per_epoch / config.training.gradient_accumulation) * config.training.epochs
    return min(total, config.training.max_steps) if config.training.max_steps else total


def _check_schedule(scheduler_config, config: TrainConfig) -> None:
    """Refuse to train epsilon on a model whose own scheduler says it predicts v (or has zero terminal SNR).

    Such an adapter would learn the wrong target and its samples would be grey noise; the fix is two settings.
    Only this direction is refused: a single-file v-pred checkpoint often comes with SDXL base's configs.
    """
    model_predicts_v = scheduler_config.get("prediction_type") == "v_prediction"
    wants_v = model_predicts_v and config.model.prediction_type != "v_prediction"
    wants_ztsnr = scheduler_config.get("rescale_betas_zero_snr") and not config.model.zero_terminal_snr
    if wants_v or wants_ztsnr:
        needed = ['model.prediction_type = "v_prediction"'] if wants_v else []
        needed += ["model.zero_terminal_snr = true"] if wants_ztsnr else []
        raise TrainingError.at(
            config.model.path,
            "this model was trained with "
            f"{'v-prediction' if wants_v else 'zero terminal SNR'} (its scheduler config says so); "
            f"set {' and '.join(needed)} in the preset's [model] section",
        )


def _load_pipeline(config: TrainConfig, device: torch.device, captions_vary: bool):
    """The pipeline placed for training (``training.placement``), its noise schedule the one training uses."""
    pipe = load_pipeline(config, device, captions_vary)
    _check_schedule(pipe.scheduler.config, config)
    if config.model.prediction_type == "v_prediction" or config.model.zero_terminal_snr:
        # sampling must use the schedule training used, or v-pred / ZTSNR samples come out grey
        pipe.scheduler = pipe.scheduler.from_config(
            pipe.scheduler.config,
            prediction_type=config.model.prediction_type,
            rescale_betas_zero_snr=config.model.zero_terminal_snr,
            **({"timestep_spacing": "trailing"} if config.model.zero_terminal_snr else {}),
        )
    return pipe


def cacheable_images(examples: list[TrainExample], augment: AugmentOptions) -> list[PlannedImage]:
    """Every crop a run can use when crops are centred: one per image, and its mirror when flipping."""
    planned = []
    for index, example in enumerate(examples):
        crop = centred_crop(example, augment.bucket_spec)
        planned += [PlannedImage(index, crop, flipped, "") for flipped in ((False, True) if example.flip else (False,))]
    return planned


def _latent_cache(
    config: TrainConfig, pipe, examples: list[TrainExample], augment, on_progress
) -> tuple[LatentCache | None, list[TrainExample]]:
    """The filled cache and the examples that can train (an image failing to load now is left out)."""
    if not config.dataset.cache_latents or config.dataset.random_crop:
        return None, examples
    root = Path(config.dataset.latent_cache_dir) if config.dataset.latent_cache_dir else default_cache_dir() / "latents"
    cache = LatentCache(root, vae_fingerprint(pipe.vae, torch.float32))
    planned = cacheable_images(examples, augment)
    filled = fill_cache(cache, examples, planned, pipe.vae, augment.background, on_progress)
    log.info(
        "latent cache %s: %d encoded now, %d reused",
        cache.folder,
        filled.encoded,
        len(planned) - filled.encoded - len(filled.unreadable),
    )
    for reason in filled.unreadable.values():
        log.warning("skipped: %s", reason)
    usable = [example for example in examples if example.path not in filled.unreadable]
    if not usable:
        raise DatasetError.at(config.dataset.path, "no image could be loaded; see the reasons above")
    return cache, usable


@torch.no_grad()
def _text_cache(config: TrainConfig, pipe, examples, device) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Caption -> (prompt embeds, pooled) when every step's caption is fixed and the encoders are frozen."""
    if text_encoders_run_every_step(config, captions_vary(config)):
        return None
    captions = sorted({process_caption(e.caption, e.captions, None) for e in examples})
    cache = {}
    for caption in captions:
        embeds, pooled = encode_captions(
            (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), [caption], device
        )
        cache[caption] = (embeds[0], pooled[0])
    return cache


def prepare_session(
    config: TrainConfig,
    device: torch.device,
    processes: int = 1,
    on_caching: Callable[[int, int], None] = lambda done, total: None,
) -> Session:
    """``processes``: how many share each global batch (batch_size images each)."""
    # the same pre-flight as `dora-studio check-data`; raises DatasetError when nothing is usable
    scan = scan_configured(config)
    report = check_configured(config, scan)
    for problem in report.problems[:MAX_PROBLEMS_LOGGED]:
        log.warning("%s%s", "skipped: " if problem.skipped else "", problem.message)
    if len(report.problems) > MAX_PROBLEMS_LOGGED:
        log.warning(
            "... and %d more; `dora-studio check-data %s` lists them all",
            len(report.problems) - MAX_PROBLEMS_LOGGED,
            config.dataset.path,
        )
    augment = augment_options(config)
    examples = plan_examples(scan, augment.bucket_spec, config.dataset.prior_loss_weight)
    validation_examples = plan_examples(scan, augment.bucket_spec, held_out=True)
    for note in config.cache_conflicts():
        log.info("note: %s", note)
    pipe = _load_pipeline(config, device, captions_vary=captions_vary(config))
    torch.manual_seed(config.training.seed)  # the adapters' random init is part of what the seed fixes
    adapters = inject_network(pipe, config)
    if config.network.init_from:  # a new run from a file's weights (not a resume)
        init_from_file(Path(config.network.init_from), pipe, adapters, config.network)
    pipe.unet.train()
    if config.network.train_text_encoders:
        pipe.text_encoder.train()
        pipe.text_encoder_2.train()
    if config.training.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.network.train_text_encoders:
            pipe.text_encoder.gradient_checkpointing_enable()
            pipe.text_encoder_2.gradient_checkpointing_enable()
    if config.training.compile:
        compile_unet(pipe.unet, adapters)
    latent_cache, usable = _latent_cache(config, pipe, examples + validation_examples, augment, on_caching)
    usable = set(usable)
    examples = [example for example in examples if example in usable]
    validation_examples = [example for example in validation_examples if example in usable]
    if not examples:
        raise DatasetError.at(config.dataset.path, "no training image could be loaded; see the reasons above")
    text_cache = _text_cache(config, pipe, examples + validation_examples, device)
    offloaded = offload_cached(pipe, latent_cache is not None, text_cache is not None, device)
    global_batch = config.training.batch_size * processes
    batches_per_epoch = len(epoch_batches(examples, global_batch, config.training.seed, epoch=0))
    total_steps = total_optimizer_steps(batches_per_epoch, config)
    optimizer, lr_scheduler = run_optimizer(config.optimizer, adapters, total_steps)
    return Session(
        config=config,
        device=device,
        pipe=pipe,
        adapters=adapters,
        trainable=trainable_parameters(adapters),
        examples=examples,
        validation_examples=validation_examples,
        augment=augment,
        noise_scheduler=training_noise_scheduler(
            dict(pipe.scheduler.config), config.model.prediction_type, config.model.zero_terminal_snr
        ),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        batches_per_epoch=batches_per_epoch,
        total_steps=total_steps,
        sample_prompts=sample_prompts(config),
        latent_cache=latent_cache,
        text_cache=text_cache,
        offloaded=offloaded,
        dataset_dirs=scan.folder_counts("train"),
        reg_dataset_dirs=scan.folder_counts("regularization"),
        tag_frequencies=scan.tag_frequency(config.dataset.tag_separator),
    )
