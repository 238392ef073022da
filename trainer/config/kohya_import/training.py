"""An sd-scripts training config (``--config_file``) as our model, network, optimizer, training, sampling and
saving settings. The dataset options in it are the dataset module's (they are the last fallback of kohya's
dataset config).

Options named in the file are carried; options left out take our defaults, except where kohya's default
changes what the adapter learns and ours differs: a network's alpha (kohya: 1, so updates are scaled by
1 / dim), its dim (4), conv alpha (1), and training the text encoders (kohya does unless told not to). Those
are written down and noted. Everything else is carried, noted as changed, or noted as not carried over.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from trainer.config.schema import OPTIMIZERS, SCHEDULERS
from trainer.errors import ConfigError

from .dataset import TRAINING_OPTIONS as DATASET_TRAINING_OPTIONS
from .dataset import UNSUPPORTED_SUBSET_OPTIONS
from .options import Notes, Options, resolve_path

# kohya option -> (our section, our setting, how it is read): carried as they are.
DIRECT = {
    "network_dim": ("network", "rank", Options.whole),
    "network_alpha": ("network", "alpha", Options.number),
    "learning_rate": ("optimizer", "learning_rate", Options.number),
    "unet_lr": ("optimizer", "unet_lr", Options.number),
    "max_grad_norm": ("optimizer", "max_grad_norm", Options.number),
    "loraplus_lr_ratio": ("optimizer", "loraplus_ratio", Options.number),
    "gradient_accumulation_steps": ("training", "gradient_accumulation", Options.whole),
    "mixed_precision": ("training", "mixed_precision", Options.text),
    "gradient_checkpointing": ("training", "gradient_checkpointing", Options.flag),
    "seed": ("training", "seed", Options.whole),
    "noise_offset": ("training", "noise_offset", Options.number),
    "min_snr_gamma": ("training", "min_snr_gamma", Options.number),
    "min_timestep": ("training", "min_timestep", Options.whole),
    "max_timestep": ("training", "max_timestep", Options.whole),
    "loss_type": ("training", "loss", Options.text),
    "huber_c": ("training", "huber_c", Options.number),
    "huber_schedule": ("training", "huber_schedule", Options.text),
    "debiased_estimation_loss": ("training", "debiased_estimation", Options.flag),
    "multires_noise_iterations": ("training", "multires_noise_iterations", Options.whole),
    "multires_noise_discount": ("training", "multires_noise_discount", Options.number),
    "ip_noise_gamma": ("training", "ip_noise_gamma", Options.number),
    "torch_compile": ("training", "compile", Options.flag),
    "ddp_timeout": ("training", "process_timeout_minutes", Options.number),
    "zero_terminal_snr": ("model", "zero_terminal_snr", Options.flag),
    "cache_latents": ("dataset", "cache_latents", Options.flag),
    "cache_text_encoder_outputs": ("dataset", "cache_text_encoder_outputs", Options.flag),
    "max_data_loader_n_workers": ("dataset", "loader_workers", Options.whole),
    "sample_at_first": ("sampling", "at_start", Options.flag),
    "output_name": ("saving", "output_name", Options.text),
    "save_every_n_epochs": ("saving", "every_n_epochs", Options.whole),
    "save_every_n_steps": ("saving", "every_n_steps", Options.whole),
    "save_last_n_epochs": ("saving", "keep_last", Options.whole),
    "save_state": ("saving", "save_state", Options.flag),
    "save_last_n_epochs_state": ("saving", "keep_last_states", Options.whole),
}
# Options read below, each by its own rule.
SPECIAL = {
    "pretrained_model_name_or_path", "v_parameterization", "fp8_base", "network_module", "network_args",
    "network_train_unet_only", "text_encoder_lr", "network_weights", "optimizer_type", "use_8bit_adam",
    "optimizer_args", "lr_scheduler", "lr_warmup_steps", "max_train_epochs", "max_train_steps", "save_precision",
    "sample_prompts", "sample_every_n_epochs", "sample_every_n_steps", "log_with", "logging_dir", "save_model_as",
    "dataset_config",
}  # fmt: skip
# Options we have nothing for, and the values that ask for nothing (kohya's defaults).
UNSUPPORTED: dict[str, tuple[str, tuple]] = {
    "v2": ("SD 2.x models are not trained here (SDXL only)", (False,)),
    "clip_skip": ("CLIP skip is not implemented here (SDXL trains without it)", (None, 1)),
    "vae": ("a separate VAE is not loaded; the model's own is used", (None,)),
    "no_half_vae": ("not needed: the VAE always runs in fp32 here", (False,)),
    "full_bf16": ("trained weights stay fp32 here; training.mixed_precision sets the compute", (False,)),
    "full_fp16": ("trained weights stay fp32 here; training.mixed_precision sets the compute", (False,)),
    "network_dropout": ("neuron dropout is not implemented here (network.rank_dropout and module_dropout are)", (0,)),
    "network_train_text_encoder_only": ("the UNet always trains here", (False,)),
    "scale_weight_norms": ("max-norm regularization is not implemented here", (0,)),
    "dim_from_weights": ("network.init_from takes its rank from network.rank", (False,)),
    "base_weights": ("adapters are not merged into the base first here (dora-studio merge does it)", (None,)),
    "noise_offset_random_strength": ("the noise offset has a fixed strength here", (False,)),
    "adaptive_noise_scale": ("the noise offset has a fixed strength here", (None, 0)),
    "ip_noise_gamma_random_strength": ("input perturbation noise has a fixed strength here", (False,)),
    "huber_scale": ("huber_c's schedules are kohya's at huber_scale 1", (1, 1.0)),
    "v_pred_like_loss": ("not implemented here", (0,)),
    "scale_v_pred_loss_like_noise_pred": ("not implemented here", (False,)),
    "weighted_captions": ("caption weights like (word:1.2) are not read here", (False,)),
    "max_token_length": ("captions are cut at 77 tokens here", (None, 75)),
    "lr_scheduler_num_cycles": ("the number of cosine restarts is not a setting here", (1,)),
    "lr_scheduler_power": ("the polynomial's power is not a setting here", (1,)),
    "lr_scheduler_type": ("custom schedulers are not loaded here", (None,)),
    "lr_scheduler_args": ("custom schedulers are not loaded here", (None,)),
    "stop_text_encoder_training": ("text encoders train to the end here", (0,)),
    "loraplus_unet_lr_ratio": ("one LoRA+ ratio for every part here (optimizer.loraplus_ratio)", (0,)),
    "loraplus_text_encoder_lr_ratio": ("one LoRA+ ratio for every part here (optimizer.loraplus_ratio)", (0,)),
    "save_last_n_steps": ("saving.keep_last counts saves, not steps", (0,)),
    "save_last_n_steps_state": ("saving.keep_last_states counts states, not steps", (0,)),
    "save_n_epoch_ratio": ("set saving.every_n_epochs", (0,)),
    "save_state_on_train_end": ("saving.save_state saves a state with every adapter", (False,)),
    "resume": ("continue a run with dora-studio train --run-dir DIR --resume auto", (None,)),
    "in_json": ("fine-tuning metadata is not read here: write captions as .txt files beside the images", (None,)),
    "sample_sampler": ("samples are drawn with one sampler here", ("ddim",)),
    "validate_every_n_epochs": ("validation runs every epoch, or every validation.every_n_steps", (None, 1)),
    "max_validation_steps": ("validation measures every held-out image here", (None,)),
} | {name: (why, (default,)) for name, (why, default) in UNSUPPORTED_SUBSET_OPTIONS.items()}
# How kohya starts, logs and labels a run: the studio does these its own way (run folders, its own metadata).
RUN_MECHANICS = {
    "output_dir", "log_prefix", "log_tracker_name", "log_tracker_config", "wandb_api_key", "wandb_run_name",
    "log_config", "xformers", "sdpa", "mem_eff_attn", "persistent_data_loader_workers", "vae_batch_size", "lowram",
    "highvram", "lowvram", "cache_latents_to_disk", "cache_text_encoder_outputs_to_disk", "huggingface_repo_id",
    "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
    "save_state_to_huggingface", "resume_from_huggingface", "async_upload", "dynamo_backend", "ddp_static_graph",
    "ddp_gradient_as_bucket_view", "tokenizer_cache_dir", "metadata_title", "metadata_author",
    "metadata_description", "metadata_license", "metadata_tags", "training_comment", "output_config", "config_file",
    "skip_cache_check", "console_log_level", "console_log_file", "console_log_simple", "debug_dataset",
    "no_metadata", "fused_backward_pass", "blocks_to_swap", "deepspeed", "caption_extention",
}  # fmt: skip
NETWORK_MODULES = {"networks.lora": "lora", "lycoris.kohya": "lora"}
LYCORIS_ALGOS = ("lora", "locon")  # plain low-rank factors, which DoRA decomposes (dora_wd)
BLOCK_ARGS = {
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
    "up_lr_weight", "block_lr_zero_threshold",
}  # fmt: skip
LYCORIS_ARGS = {
    "train_norm", "use_tucker", "use_scalar", "bypass_mode", "rank_dropout_scale", "constrain", "rescaled", "use_cp",
    "decompose_both", "factor", "train_on_input", "block_size", "unit",
}  # fmt: skip
OPTIMIZER_ALIASES = {"pagedadamw8bit": "adamw8bit", "pagedadamw": "adamw", "pagedadamw32bit": "adamw"}
SAVE_DTYPES = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "stabilityai/stable-diffusion-xl-base-1.0"
KOHYA_STEPS = 1600  # max_train_steps' default
KNOWN = set(DIRECT) | SPECIAL | set(UNSUPPORTED) | RUN_MECHANICS | DATASET_TRAINING_OPTIONS


def training_settings(options: Options, notes: Notes) -> dict[str, dict]:
    """Our settings from an sd-scripts training config (its dataset options excepted)."""
    sections = ("model", "dataset", "network", "optimizer", "training", "sampling", "saving")
    settings: dict[str, dict] = {name: {} for name in sections}
    for kohya, (section, ours, read) in DIRECT.items():
        value = read(options, kohya)
        if value is not None:
            settings[section][ours] = value
    _model(options, settings["model"], notes)
    _network(options, settings, notes)
    _optimizer(options, settings["optimizer"], notes)
    _length(options, settings, notes)
    _sampling(options, settings["sampling"], notes)
    _saving(options, settings["saving"], notes)
    _not_carried(options, notes)
    return settings


def _asks_for(value: Any, defaults: tuple) -> bool:
    """Whether ``value`` differs from every one of an option's do-nothing values (the GUI writes "75" for 75)."""
    return not any(value == default or str(value) == str(default) for default in ("", None, *defaults))


def _not_carried(options: Options, notes: Notes) -> None:
    for name, value in options.values.items():
        if name in UNSUPPORTED and _asks_for(value, UNSUPPORTED[name][1]):
            notes.drop(name, UNSUPPORTED[name][0])
        elif name in RUN_MECHANICS and value not in ("", None, False):
            notes.drop(name, "how kohya starts, logs or labels a run; the studio does it its own way")
        elif name not in KNOWN:
            notes.drop(name, "not an sd-scripts option this import knows; check its spelling")


def _model(options: Options, model: dict, notes: Notes) -> None:
    name = options.text("pretrained_model_name_or_path")
    if name and HUB_ID.match(name) and Path(name).suffix != ".safetensors" and not (options.folder / name).exists():
        notes.drop(
            "pretrained_model_name_or_path",
            f"{name} is a Hugging Face model id: download it and set model.path to its folder or .safetensors file",
        )
    elif name:
        model["path"] = resolve_path(name, options.folder, "pretrained_model_name_or_path", notes)
    if options.flag("v_parameterization"):
        model["prediction_type"] = "v_prediction"
    if options.flag("fp8_base"):
        model["base_precision"] = "fp8"
        notes.change("fp8_base", "model.base_precision = fp8: float8 with a scale per row (kohya casts weights)")


def _literal(text: str) -> Any:
    """A ``key=value`` argument's value as kohya reads it (``ast.literal_eval``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _arguments(options: Options, name: str) -> dict[str, Any]:
    """``network_args`` / ``optimizer_args``: ``["conv_dim=8", "algo=lora"]`` as a dict."""
    pairs = [item.partition("=") for item in options.texts(name)]
    return {key.strip(): _literal(value.strip()) for key, _, value in pairs}


def _arg(args: dict[str, Any], name: str, where: str, default: float | None = None) -> float:
    """A numeric ``network_args`` / ``optimizer_args`` value, taken out of ``args``; ``where`` names the option."""
    value = args.pop(name, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError.at(f"{where} {name}", f"expected a number, got {value!r}; fix it in the file") from None


def _network(options: Options, settings: dict[str, dict], notes: Notes) -> None:
    """network_module (and LyCORIS's algo) as our kind, kohya's defaults, the starting weights, the text encoders."""
    network, module = settings["network"], options.text("network_module")
    args = _arguments(options, "network_args")
    kind, algo = NETWORK_MODULES.get(module or ""), args.pop("algo", "lora")
    if module is None:
        notes.drop("network_module", "not set: not a train_network.py config? network.kind stays its default")
    elif kind is None or module == "lycoris.kohya" and algo not in LYCORIS_ALGOS:
        kind = "lora"
        what = f"LyCORIS algo={algo}" if module == "lycoris.kohya" else module
        notes.drop(
            "network_module",
            f"{what} is not trained here: the preset trains LoRA (DoRA with dora_wd) at the same dim instead",
        )
    if kind is not None:
        network["kind"] = "dora" if args.pop("dora_wd", False) is True else kind
        _network_defaults(options, network, notes)
    _network_arguments(args, f"{options.where}: network_args", settings, notes)
    if options.has("network_weights"):
        weights = options.text("network_weights") or ""
        network["init_from"] = resolve_path(weights, options.folder, "network_weights", notes)
    _text_encoders(options, settings, notes)


def _network_arguments(args: dict[str, Any], where: str, settings: dict[str, dict], notes: Notes) -> None:
    """``network_args`` after the algo: conv layers, dropouts, LoRA+, LyCORIS's preset, and what is left."""
    network = settings["network"]
    if args.get("conv_dim"):
        network["unet_targets"], network["conv_rank"] = "attn+conv", int(_arg(args, "conv_dim", where))
        if "conv_alpha" not in args:
            notes.default("conv_alpha", "not set: kohya scales conv updates by 1 / conv_dim (conv_alpha = 1)")
        network["conv_alpha"] = _arg(args, "conv_alpha", where, 1)
    for name in ("conv_dim", "conv_alpha"):  # without conv_dim they ask for nothing
        args.pop(name, None)
    for name in ("rank_dropout", "module_dropout"):
        if name in args:
            network[name] = _arg(args, name, where)
    if "loraplus_lr_ratio" in args:
        settings["optimizer"]["loraplus_ratio"] = _arg(args, "loraplus_lr_ratio", where)
    preset = args.pop("preset", "full")
    if preset != "full":
        targets = network.get("unet_targets", "attn")
        notes.change(
            "network_args preset",
            f"LyCORIS's {preset} preset picks its own layers; here network.unet_targets = {targets} does",
        )
    for name, value in args.items():
        if value in (None, "", False, 0, "None", "none"):
            continue
        if name in BLOCK_ARGS:
            notes.drop(f"network_args {name}", "per-block ranks and learning rates are not implemented here")
        elif name in LYCORIS_ARGS:
            notes.drop(f"network_args {name}", "a LyCORIS option with no setting here")
        else:
            notes.drop(f"network_args {name}", "not a network argument this import knows")


def _network_defaults(options: Options, network: dict, notes: Notes) -> None:
    """kohya's dim and alpha where the file leaves them out: they set how strongly the adapter changes the model."""
    if not options.has("network_dim"):
        network["rank"] = 4
        notes.default("network_dim", "not set: kohya trains at dim 4")
    if not options.has("network_alpha"):
        network["alpha"] = 1.0
        notes.default("network_alpha", "not set: kohya scales updates by 1 / dim (network_alpha = 1)")


def _text_encoders(options: Options, settings: dict[str, dict], notes: Notes) -> None:
    """kohya trains the text encoders unless network_train_unet_only, and a rate of 0 trains nothing;
    text_encoder_lr is one rate, or one per encoder (CLIP-L, then OpenCLIP-G)."""
    if not options.has("network_module"):
        return
    rates = options.numbers("text_encoder_lr")
    unet_only = bool(options.flag("network_train_unet_only")) or bool(rates) and not any(rates)
    settings["network"]["train_text_encoders"] = not unet_only
    if options.flag("network_train_unet_only") is None and not unet_only:
        notes.default("network_train_unet_only", "not set: kohya trains the text encoders too")
    if rates and not unet_only:
        settings["optimizer"]["text_encoder_1_lr"], settings["optimizer"]["text_encoder_2_lr"] = rates[0], rates[-1]


def _optimizer(options: Options, optimizer: dict, notes: Notes) -> None:
    """optimizer_type by its class name (``bitsandbytes.optim.AdamW8bit`` is AdamW8bit), and its arguments."""
    name = "adamw8bit" if options.flag("use_8bit_adam") else (options.text("optimizer_type") or "adamw")
    chosen = name.rpartition(".")[2].lower()
    if chosen in OPTIMIZER_ALIASES:
        notes.change(
            "optimizer_type", f"{name} becomes {OPTIMIZER_ALIASES[chosen]}: its state is not paged to CPU memory here"
        )
        chosen = OPTIMIZER_ALIASES[chosen]
    if chosen in OPTIMIZERS:
        optimizer["name"] = chosen
    else:
        notes.drop("optimizer_type", f"{name} is not one here ({', '.join(OPTIMIZERS)}); optimizer.name stays adamw")
    args, where = _arguments(options, "optimizer_args"), f"{options.where}: optimizer_args"
    for name in ("weight_decay", "eps"):
        if name in args:
            optimizer[name] = _arg(args, name, where)
    betas = args.pop("betas", None)
    if betas is not None:
        try:
            optimizer["betas"] = [float(beta) for beta in betas]  # "betas=0.9,0.999" reads as a tuple
        except (TypeError, ValueError):
            raise ConfigError.at(f"{where} betas", f"expected two numbers like 0.9,0.999, got {betas!r}") from None
    if chosen == "adafactor" and args.get("relative_step", True) is not False:
        notes.change(
            "optimizer_type",
            "Adafactor: kohya's default relative_step=True ignores the learning rate; "
            "here optimizer.learning_rate and the scheduler apply",
        )
    for key in args:
        notes.drop(f"optimizer_args {key}", f"not a setting of {optimizer.get('name', 'adamw')} here")
    scheduler = options.text("lr_scheduler")
    if scheduler in SCHEDULERS:
        optimizer["scheduler"] = scheduler
    elif scheduler:
        notes.drop(
            "lr_scheduler",
            f"{scheduler} is not a schedule here ({', '.join(SCHEDULERS)}); optimizer.scheduler stays its default",
        )


def _length(options: Options, settings: dict[str, dict], notes: Notes) -> None:
    """Epochs or steps (kohya: max_train_epochs overrides max_train_steps), then the warm-up, which kohya
    also takes as a fraction of the steps when it is below 1."""
    training, epochs, steps = settings["training"], options.whole("max_train_epochs"), options.whole("max_train_steps")
    if epochs:
        training["epochs"] = epochs
        if steps:
            notes.drop("max_train_steps", "kohya ignores it when max_train_epochs is set")
    elif steps:
        training["max_steps"] = training["epochs"] = steps
        notes.change(
            "max_train_steps",
            f"training.max_steps = {steps}, with training.epochs = {steps} so that the steps decide, as in kohya",
        )
    else:
        notes.default(
            "max_train_steps",
            f"neither it nor max_train_epochs is set: kohya trains {KOHYA_STEPS} steps; here training.epochs decides",
        )
    warmup = options.number("lr_warmup_steps")
    if warmup is not None and 0 < warmup < 1:
        if steps and not epochs:
            settings["optimizer"]["warmup_steps"] = int(warmup * steps)
        else:
            notes.drop(
                "lr_warmup_steps",
                f"{warmup} of the steps, which are not known before the dataset is scanned: set optimizer.warmup_steps",
            )
    elif warmup is not None:
        settings["optimizer"]["warmup_steps"] = int(warmup)


def _sampling(options: Options, sampling: dict, notes: Notes) -> None:
    """A prompt file, and kohya's schedule: no sampling unless a schedule is set; epochs override steps."""
    prompts = options.text("sample_prompts")
    if prompts and Path(prompts).suffix.lower() in (".toml", ".json"):
        notes.drop(
            "sample_prompts",
            "kohya's TOML and JSON prompt files are not read; write one prompt per line "
            "(--n, --w, --h, --s, --l, --d as kohya's) in a .txt file",
        )
    elif prompts:
        sampling["prompt_file"] = resolve_path(prompts, options.folder, "sample_prompts", notes)
    epochs, steps = options.whole("sample_every_n_epochs"), options.whole("sample_every_n_steps")
    if epochs and steps:
        notes.drop("sample_every_n_steps", "kohya ignores it when sample_every_n_epochs is set")
    if prompts or epochs or steps:
        sampling["every_n_epochs"], sampling["every_n_steps"] = epochs or 0, 0 if epochs else steps or 0


def _saving(options: Options, saving: dict, notes: Notes) -> None:
    precision = options.text("save_precision")
    if precision in SAVE_DTYPES:
        saving["save_dtype"] = SAVE_DTYPES[precision]
    log_with = options.text("log_with")
    if log_with in ("tensorboard", "all") or log_with is None and options.has("logging_dir"):
        saving["tensorboard"] = True
    if log_with in ("wandb", "all"):
        saving["wandb"] = "online"
        if options.has("log_tracker_name"):
            saving["wandb_project"] = options.text("log_tracker_name")
    if options.text("save_model_as") not in (None, "safetensors"):
        notes.drop("save_model_as", "adapters are always saved as .safetensors here")
