"""A kohya_ss GUI config (its saved .json) as the sd-scripts options the GUI would have run with.

The GUI turns its form into sd-scripts options in ``kohya_gui/lora_gui.py`` (``train_model``): ``LoRA_type``
picks ``network_module`` and the ``network_args`` it builds from the LyCORIS fields, ``epoch`` is the number
of epochs, ``max_resolution`` the resolution, ``optimizer`` the optimizer type, ``lr_warmup`` a percentage of
the steps, and ``sample_prompts`` the prompts themselves (the GUI writes them to a file). Like the GUI, this
leaves out every value that is empty, false or zero, since the GUI never passes those on. What comes out is
read as an sd-scripts training config.
"""

from __future__ import annotations

from typing import Any

from .options import Notes

# LoRA_type -> (network_module, LyCORIS algo); "Kohya LoCon" is networks.lora with conv layers.
NETWORKS = {
    "Standard": ("networks.lora", None),
    "Kohya LoCon": ("networks.lora", None),
    "LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3"),
    "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora"),
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora"),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft"),
    "LyCORIS/BOFT": ("lycoris.kohya", "boft"),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full"),
    "Kohya DyLoRA": ("networks.dylora", None),
    "LoRA-FA": ("networks.lora_fa", None),
    "Flux1": ("networks.lora_flux", None),
}
# GUI fields that become network_args (LyCORIS_preset is LyCORIS's "preset"), by which networks read them.
LYCORIS_FIELDS = {
    "LyCORIS_preset": "preset", "conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "dora_wd": "dora_wd",
    "rank_dropout": "rank_dropout", "module_dropout": "module_dropout", "use_tucker": "use_tucker",
    "use_scalar": "use_scalar", "bypass_mode": "bypass_mode", "rank_dropout_scale": "rank_dropout_scale",
    "train_norm": "train_norm", "constrain": "constrain", "rescaled": "rescaled", "factor": "factor",
    "use_cp": "use_cp", "decompose_both": "decompose_both", "train_on_input": "train_on_input", "unit": "block_size",
}  # fmt: skip
KOHYA_FIELDS = {
    "rank_dropout", "module_dropout", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
}  # fmt: skip
CONV_TYPES = {"Kohya LoCon", "Kohya DyLoRA"}  # networks.* types the GUI passes conv_dim to
# How the GUI starts a run (accelerate, its own form state): nothing of what is learned.
LAUNCHER = {
    "num_cpu_threads_per_process", "num_machines", "multi_gpu", "gpu_ids", "main_process_port",
    "extra_accelerate_launch_args", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "model_list",
    "training_preset", "save_as_bool", "use_wandb", "noise_offset_type", "sdxl_checkbox", "flux1_checkbox",
    "sd3_checkbox", "stop_text_encoder_training_pct", "headless", "print_only",
}  # fmt: skip
RENAMED = {
    "optimizer": "optimizer_type",
    "max_resolution": "resolution",
    "lora_network_weights": "network_weights",
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sdxl_no_half_vae": "no_half_vae",
}


def _asks_for_something(value: Any) -> bool:
    """The GUI passes a value on only when it is not empty, false or zero (``lora_gui.train_model``); it keeps
    numbers as text in places ("0", "75")."""
    if isinstance(value, str):
        try:
            return float(value) != 0
        except ValueError:
            return value.strip() != ""
    return value not in (None, False, 0, [])


def sd_scripts_options(gui: dict, notes: Notes) -> tuple[dict, dict[str, dict]]:
    """The sd-scripts options the GUI would pass, and the settings it gives directly (its prompts)."""
    values = {key: value for key, value in gui.items() if _asks_for_something(value)}
    options: dict[str, Any] = {}
    lora_type = values.pop("LoRA_type", "Standard")
    module, algo = NETWORKS.get(lora_type, (None, None))
    if module is None:
        notes.drop("LoRA_type", f"{lora_type!r} is not a kohya_ss network type this import knows")
    else:
        options["network_module"] = module
        options["network_args"] = _network_args(values, lora_type, module, algo)
    if values.pop("sdxl", None) is None and "sdxl" in gui:
        notes.drop(
            "sdxl",
            "false: the config trains SD 1.x or 2.x; only SDXL trains here: check model.path and the learning rates",
        )
    if values.get("xformers") == "none":
        values.pop("xformers")
    if values.pop("noise_offset_type", "Original") == "Multires":
        values.pop("noise_offset", None)
    else:
        values.pop("multires_noise_iterations", None), values.pop("multires_noise_discount", None)
    _learning_rates(values, gui)
    epochs = values.pop("epoch", None)
    if epochs and "max_train_epochs" not in values:
        options["max_train_epochs"] = epochs
    warmup = values.pop("lr_warmup", None)  # a percentage of the steps; sd-scripts reads a fraction below 1
    if warmup and "lr_warmup_steps" not in values:
        options["lr_warmup_steps"] = float(warmup) / 100
    settings: dict[str, dict] = {}
    prompts = values.pop("sample_prompts", "")
    if isinstance(prompts, str) and prompts.strip():
        settings["sampling"] = {"prompts": [line.strip() for line in prompts.splitlines() if line.strip()]}
    processes = values.pop("num_processes", None)
    if isinstance(processes, int) and processes > 1:
        settings["training"] = {"processes": processes}
    launcher = sorted(key for key in values if key in LAUNCHER)
    for key in launcher:
        notes.drop(key, "how kohya_ss launches a run; the studio starts its own")
    for key, value in values.items():
        if key not in LAUNCHER:
            options[RENAMED.get(key, key)] = value
    return options, settings


def _network_args(values: dict, lora_type: str, module: str, algo: str | None) -> list[str]:
    """``network_args`` as the GUI builds them for ``lora_type``; the fields it reads are taken out of ``values``."""
    lycoris = module == "lycoris.kohya"
    args = [f"algo={algo}"] if algo else []
    fields = LYCORIS_FIELDS if lycoris else {name: name for name in KOHYA_FIELDS}
    if lora_type in CONV_TYPES:
        fields = fields | {"conv_dim": "conv_dim", "conv_alpha": "conv_alpha"}
    for field, name in fields.items():
        if field in values:
            args.append(f"{name}={values.pop(field)}")
    for field in (*LYCORIS_FIELDS, *KOHYA_FIELDS):  # the other types' fields: the GUI leaves them out
        values.pop(field, None)
    return args


def _learning_rates(values: dict, gui: dict) -> None:
    """The GUI's rule: a zero text-encoder rate with a UNet rate trains the UNet only (and the reverse), and
    learning_rate is not passed when either part has its own."""
    unet, text_encoder = float(gui.get("unet_lr") or 0), float(gui.get("text_encoder_lr") or 0)
    if unet and not text_encoder:
        values["network_train_unet_only"] = True
    if text_encoder and not unet:
        values["network_train_text_encoder_only"] = True
    if unet or text_encoder:
        values.pop("learning_rate", None)
