"""The one typed list of training settings: presets, ``--set`` overrides and the UI form all come from it.

Each section is a dataclass; each setting a field whose metadata carries its help text, choices and
bounds, so the CLI documentation, preset validation and the UI's form fields cannot drift apart.
Checking a value against its field is generic (``config.parsing``); rules that tie several settings
together live in ``TrainConfig.problems``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from trainer.errors import Problem

from .dataset_settings import DatasetSettings, ValidationSettings
from .fields import setting
from .training_settings import TrainingSettings

ADAPTER_KINDS = ("dora", "lora", "dvora", "vera")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class ModelSettings:
    path: str = setting(
        "builtin:tiny-sdxl",
        "SDXL base model: a diffusers folder, a single-file .safetensors checkpoint, builtin:toy-sdxl (a small "
        "pretrained model that draws shapes) or builtin:tiny-sdxl (random, for tests)",
        path=True,
    )
    config_dir: str = setting(
        "",
        "diffusers config folder for a single-file checkpoint (default: a folder named like the file)",
        path=True,
        advanced=True,
    )
    prediction_type: str = setting(
        "epsilon",
        "what the UNet predicts: epsilon (SDXL base) or v_prediction (v-pred fine-tunes)",
        choices=("epsilon", "v_prediction"),
        advanced=True,
    )
    zero_terminal_snr: bool = setting(
        False,
        "rescale the noise schedule to zero terminal SNR (use with v_prediction models trained so)",
        advanced=True,
    )
    base_precision: str = setting(
        "auto",
        "how the frozen UNet (and text encoders that run every step) are stored: auto (training.mixed_precision), "
        "fp8 (float8 with a scale per row, about half of bf16) or nf4 (4-bit NormalFloat as in QLoRA, about a "
        "quarter); fp8 and nf4 train QLoRA / QDoRA and need torchao",
        choices=("auto", "fp8", "nf4"),
    )


@dataclass
class NetworkSettings:
    kind: str = setting(
        "dora",
        "adapter type; vera and dvora train vectors over shared random matrices (use a high rank, e.g. 256)",
        choices=ADAPTER_KINDS,
    )
    dora_axis: str = setting(
        "input",
        "DoRA magnitude per input column (kohya, LyCORIS, front ends) or per output row (PEFT)",
        choices=("input", "output"),
        advanced=True,
    )
    rank: int = setting(16, "adapter rank (dim) for attention and 1x1 layers", minimum=1, maximum=1024)
    alpha: float = setting(16.0, "scale alpha: updates are scaled by alpha / rank", minimum=0.0)
    unet_targets: str = setting(
        "attn", "UNet layers to adapt: attention only, or attention and convolutions", choices=("attn", "attn+conv")
    )
    conv_rank: int = setting(8, "rank for 3x3 convolutions (with attn+conv)", minimum=1, maximum=1024)
    conv_alpha: float = setting(4.0, "alpha for 3x3 convolutions (with attn+conv)", minimum=0.0)
    include: list[str] = setting([], "only adapt layers whose stem matches one of these regexes", advanced=True)
    exclude: list[str] = setting([], "never adapt layers whose stem matches one of these regexes", advanced=True)
    train_text_encoders: bool = setting(False, "also adapt both text encoders (CLIP-L and OpenCLIP-G)")
    init_from: str = setting(
        "",
        "start from an existing adapter file (kohya, LyCORIS or ours) instead of zero: a new run with a new "
        "schedule, not a resume; a LoRA file can start a DoRA run (magnitude set so the merged weight is unchanged)",
        path=True,
        advanced=True,
    )
    module_dropout: float = setting(
        0.0, "chance a layer's adapter is skipped in a step", minimum=0.0, maximum=0.999, advanced=True
    )
    rank_dropout: float = setting(
        0.0, "chance each rank channel is dropped in a step", minimum=0.0, maximum=0.999, advanced=True
    )
    vera_seed: int = setting(
        0, "vera/dvora: seed of the shared random matrices (the file records it)", minimum=0, advanced=True
    )
    vera_d_initial: float = setting(
        0.1, "vera/dvora: starting value of each layer's rank-wise scaling vector d (VeRA's)", advanced=True
    )

    @property
    def has_magnitude(self) -> bool:
        """DoRA's magnitude trains (dora, dvora)."""
        return self.kind in ("dora", "dvora")

    @property
    def uses_projections(self) -> bool:
        """The factors are VeRA's scaled shared projections (vera, dvora)."""
        return self.kind in ("vera", "dvora")


@dataclass
class OptimizerSettings:
    name: str = setting(
        "adamw", "optimizer (adamw8bit needs bitsandbytes, prodigy needs prodigyopt)", choices=OPTIMIZERS
    )
    learning_rate: float = setting(1e-4, "learning rate for every part without its own", minimum=0.0)
    unet_lr: float | None = setting(None, "UNet learning rate (default: learning_rate)", minimum=0.0)
    text_encoder_1_lr: float | None = setting(None, "CLIP-L learning rate (default: learning_rate)", minimum=0.0)
    text_encoder_2_lr: float | None = setting(None, "OpenCLIP-G learning rate (default: learning_rate)", minimum=0.0)
    weight_decay: float = setting(0.01, "weight decay (never applied to DoRA magnitudes)", minimum=0.0, advanced=True)
    betas: list[float] = setting([0.9, 0.999], "Adam betas", advanced=True)
    eps: float = setting(1e-8, "Adam epsilon", minimum=0.0, advanced=True)
    scheduler: str = setting("constant_with_warmup", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = setting(0, "steps of linear warm-up", minimum=0)
    loraplus_ratio: float = setting(
        0.0,
        "LoRA+ (Hayou et al. 2024): the up matrices train at this many times the learning rate (16 is usual; 0: off)",
        minimum=0.0,
        advanced=True,
    )
    max_grad_norm: float = setting(1.0, "clip gradients to this norm (0: no clipping)", minimum=0.0, advanced=True)


@dataclass
class SamplingSettings:
    prompts: list[str] = setting([], "sample prompts, kohya syntax: text --n negative --w --h --s --l --d")
    prompt_file: str = setting(
        "", "file with one kohya-syntax prompt per line (added to prompts)", path=True, advanced=True
    )
    every_n_epochs: int = setting(1, "sample after every N epochs (0: never)", minimum=0)
    every_n_steps: int = setting(0, "also sample every N steps (0: never)", minimum=0, advanced=True)
    at_start: bool = setting(False, "sample the base model before training, for comparison")
    steps: int = setting(20, "sampling steps unless a prompt says --s", minimum=1)
    guidance_scale: float = setting(7.0, "CFG scale unless a prompt says --l", minimum=0.0)
    seed: int = setting(0, "seed of the first prompt (prompt i uses seed + i unless it says --d)", minimum=0)
    use_ema: bool = setting(False, "sample with the adapter's moving average (training.ema_decay)", advanced=True)


@dataclass
class SavingSettings:
    output_name: str = setting("adapter", "adapter file name (without .safetensors)")
    save_dtype: str = setting("fp16", "precision of the saved adapter", choices=("fp16", "bf16", "fp32"))
    export_rank: int = setting(
        0,
        "cut each layer's update to this rank by SVD in the saved file (0: the trained rank); for vera/dvora's "
        "large ranks, whose files are too big to share; the error is recorded in the file",
        minimum=0,
        maximum=1024,
        advanced=True,
    )
    every_n_epochs: int = setting(1, "save an adapter after every N epochs (0: only at the end)", minimum=0)
    every_n_steps: int = setting(0, "also save every N steps (0: never)", minimum=0, advanced=True)
    keep_last: int = setting(0, "keep only the newest N intermediate adapters (0: keep all)", minimum=0, advanced=True)
    save_state: bool = setting(True, "save optimizer state with each adapter so the run can resume", advanced=True)
    keep_last_states: int = setting(2, "resume states kept (each is about 3x the adapter)", minimum=1, advanced=True)
    tensorboard: bool = setting(False, "also log to TensorBoard in the run folder (needs tensorboard)", advanced=True)
    wandb: str = setting(
        "off",
        "also log to Weights & Biases (needs wandb): online, or offline (a folder in the run; `wandb sync` later)",
        choices=("off", "online", "offline"),
        advanced=True,
    )
    wandb_project: str = setting("dora-studio", "the Weights & Biases project", advanced=True)
    thumbnail: bool = setting(
        False,
        "embed the newest sample of sampling prompt thumbnail_prompt in each saved adapter (modelspec.thumbnail, "
        "which model sites and front ends show)",
        advanced=True,
    )
    thumbnail_prompt: int = setting(
        0, "which sample prompt the thumbnail shows (0: the first)", minimum=0, advanced=True
    )


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "dataset": DatasetSettings,
    "network": NetworkSettings,
    "optimizer": OptimizerSettings,
    "training": TrainingSettings,
    "validation": ValidationSettings,
    "sampling": SamplingSettings,
    "saving": SavingSettings,
}


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    saving: SavingSettings = field(default_factory=SavingSettings)

    def problems(self) -> list[Problem]:
        """Rules between settings that the fields alone cannot check, each naming its setting."""
        found = []
        d = self.dataset
        if not d.path and not any(s.role == "train" for s in d.subsets):
            found.append(
                Problem(
                    "dataset.path",
                    "missing; set it to the folder of your training images (or add a [[dataset.subsets]] table)",
                )
            )
        for index, subset in enumerate(d.subsets):
            if not subset.path:
                found.append(Problem(f"dataset.subsets[{index}].path", "missing; set it to the subset's folder"))
        if self.validation.path and self.validation.images:
            found.append(
                Problem(
                    "validation.images",
                    "set either validation.path (a held-out folder) or validation.images (images split off), not both",
                )
            )
        if not d.min_bucket_side <= d.resolution <= d.max_bucket_side:
            found.append(
                Problem(
                    "dataset.resolution",
                    f"{d.resolution} must lie between dataset.min_bucket_side "
                    f"({d.min_bucket_side}) and dataset.max_bucket_side ({d.max_bucket_side})",
                )
            )
        if not _is_hex_colour(d.background_colour):
            found.append(
                Problem("dataset.background_colour", f'{d.background_colour!r} is not a colour like "#ffffff"')
            )
        if len(self.optimizer.betas) != 2 or not all(0 <= b < 1 for b in self.optimizer.betas):
            found.append(Problem("optimizer.betas", "give two numbers in [0, 1), like [0.9, 0.999]"))
        if not self.saving.output_name or any(c in self.saving.output_name for c in '/\\:*?"<>|'):
            found.append(Problem("saving.output_name", f"{self.saving.output_name!r} must be a plain file name"))
        if self.model.zero_terminal_snr and self.model.prediction_type != "v_prediction":
            found.append(
                Problem(
                    "model.zero_terminal_snr",
                    'needs model.prediction_type = "v_prediction" (with '
                    "epsilon the last timestep has nothing to predict: Lin et al. 2023, section 3.2)",
                )
            )
        if self.saving.export_rank >= self.network.rank:
            found.append(
                Problem(
                    "saving.export_rank",
                    f"{self.saving.export_rank} is not below network.rank ({self.network.rank}): "
                    "set it lower, or 0 to save the trained rank",
                )
            )
        part_lrs = {self.optimizer.unet_lr, self.optimizer.text_encoder_1_lr, self.optimizer.text_encoder_2_lr}
        if self.optimizer.name == "prodigy" and len(part_lrs - {None}) > 0 and self.network.train_text_encoders:
            if len({lr if lr is not None else self.optimizer.learning_rate for lr in part_lrs}) > 1:
                found.append(
                    Problem(
                        "optimizer.unet_lr / text_encoder_*_lr",
                        "prodigy finds one step size for all "
                        "parts; leave them unset and set optimizer.learning_rate (usually 1.0)",
                    )
                )
        if self.optimizer.name == "prodigy" and self.optimizer.loraplus_ratio not in (0.0, 1.0):
            found.append(
                Problem(
                    "optimizer.loraplus_ratio",
                    "prodigy finds one step size for all parameters and refuses groups with different learning "
                    "rates; set optimizer.loraplus_ratio = 0, or choose another optimizer (adamw) for LoRA+",
                )
            )
        t = self.training
        if t.min_timestep >= t.max_timestep:
            found.append(
                Problem(
                    "training.min_timestep",
                    f"{t.min_timestep} must be below training.max_timestep ({t.max_timestep}); timesteps are 0-999",
                )
            )
        if self.sampling.use_ema and not t.ema_decay:
            found.append(Problem("sampling.use_ema", "needs training.ema_decay (e.g. 0.999): there is no average"))
        prompts = len(self.sampling.prompts)
        if self.saving.thumbnail and not self.sampling.prompt_file and self.saving.thumbnail_prompt >= prompts:
            found.append(
                Problem(
                    "saving.thumbnail_prompt",
                    f"there is no sample prompt {self.saving.thumbnail_prompt} to draw the thumbnail from "
                    f"({prompts} in sampling.prompts, the first is 0): add prompts or choose another",
                )
            )
        for key in ("network.include", "network.exclude"):
            for pattern in lookup(self, key):
                try:
                    re.compile(pattern)
                except re.error as error:
                    found.append(Problem(key, f"{pattern!r} is not a valid regex ({error})"))
        return found

    def cache_conflicts(self) -> list[str]:
        """Which option turns off which cache, so the user is told rather than left to wonder."""
        notes = []
        if self.dataset.cache_latents and self.dataset.random_crop:
            notes.append("dataset.random_crop disables dataset.cache_latents (each step crops anew)")
        if self.dataset.cache_text_encoder_outputs:
            if self.network.train_text_encoders:
                notes.append("network.train_text_encoders disables dataset.cache_text_encoder_outputs")
            randomising = [k for k in ("shuffle_tags", "caption_dropout", "tag_dropout") if getattr(self.dataset, k)]
            if randomising:
                notes.append(
                    f"dataset.{randomising[0]} disables dataset.cache_text_encoder_outputs "
                    "(captions change between steps)"
                )
        return notes


def _is_hex_colour(text: str) -> bool:
    return len(text) == 7 and text.startswith("#") and all(c in "0123456789abcdefABCDEF" for c in text[1:])


def fields_of(section: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(section))


def table_class(annotation: Any) -> type | None:
    """The settings class of a list-of-tables setting (``list[SubsetSettings]``), else None."""
    if get_origin(annotation) is list and dataclasses.is_dataclass(get_args(annotation)[0]):
        return get_args(annotation)[0]
    return None


def keys_of(cls: type, prefix: str, tables: bool) -> list[str]:
    """``prefix.name`` per field; with ``tables``, a table list's own keys follow it (``dataset.subsets[].path``)."""
    keys = []
    for spec in fields_of(cls):
        keys.append(f"{prefix}.{spec.name}")
        table = table_class(field_type(cls, spec.name)) if tables else None
        if table is not None:
            keys += keys_of(table, f"{prefix}.{spec.name}[]", tables)
    return keys


def all_keys(tables: bool = False) -> list[str]:
    """Every dotted key, e.g. 'network.rank', in schema order; ``tables``: with the subsets' keys too."""
    return [key for name, section in SECTIONS.items() for key in keys_of(section, name, tables)]


def field_type(section: type, name: str) -> Any:
    return get_type_hints(section)[name]


def lookup(config: TrainConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)
