"""Where a run's models live, and in what precision.

The UNet, and the text encoders when they run every step, are in the compute dtype or, with
``model.base_precision``, stored quantized (``adapters.quantized``); the VAE is in fp32 (SDXL's VAE
overflows in fp16). Once latents and caption embeddings are cached, training needs neither the VAE nor the
text encoders: they wait in CPU memory ("offloaded") and come back to the device only while samples are
drawn.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from trainer.adapters.quantized import quantize_frozen
from trainer.builtin.resolve import resolve_model_path
from trainer.config.schema import TrainConfig
from trainer.errors import TrainingError
from trainer.kohya.adapter_file import DTYPES
from trainer.sdxl.model_files import load_sdxl_pipeline

log = logging.getLogger("dora_studio")
OFFLOAD_DEVICE = torch.device("cpu")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """The frozen weights' dtype: the compute precision ("no" is full precision)."""
    return DTYPES.get(config.training.mixed_precision, torch.float32)


def text_encoders_run_every_step(config: TrainConfig, captions_vary: bool) -> bool:
    """They do when they train, or when captions change between steps or their cache is off."""
    return config.network.train_text_encoders or captions_vary or not config.dataset.cache_text_encoder_outputs


def quantized_components(config: TrainConfig, captions_vary: bool) -> tuple[str, ...]:
    """What ``model.base_precision`` stores quantized: the UNet, and the text encoders if they run every step."""
    if config.model.base_precision == "auto":
        return ()
    return ("unet", *(TEXT_ENCODERS if text_encoders_run_every_step(config, captions_vary) else ()))


def parked_components(latents_cached: bool, captions_cached: bool) -> tuple[str, ...]:
    """What training never runs, so it can wait in CPU memory: the VAE and the text encoders, once cached."""
    return (("vae",) if latents_cached else ()) + (TEXT_ENCODERS if captions_cached else ())


def load_pipeline(config: TrainConfig, device: torch.device, captions_vary: bool):
    """The SDXL pipeline on ``device``: frozen weights in the compute dtype (or quantized), the VAE in fp32.

    A quantized model is quantized layer by layer as it moves to the device, so its full-precision weights
    never have to fit there.
    """
    pipe = load_sdxl_pipeline(resolve_model_path(config.model.path), config.model.config_dir or None)
    dtype, quantized = weight_dtype(config), quantized_components(config, captions_vary)
    for name in ("unet", *TEXT_ENCODERS):
        model = getattr(pipe, name)
        if name in quantized:
            _quantize(name, model, config.model.base_precision, device, dtype)
        model.to(device, dtype)
    pipe.vae.to(device, torch.float32)
    for model in (pipe.unet, *(getattr(pipe, name) for name in TEXT_ENCODERS), pipe.vae):
        model.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quantize(name: str, model: torch.nn.Module, precision: str, device: torch.device, dtype: torch.dtype) -> None:
    if precision == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise TrainingError.at(
            "model.base_precision", f"torch {torch.__version__} has no float8 dtype; upgrade torch or use nf4"
        )
    report = quantize_frozen(model, precision, device, dtype)
    log.info(
        "%s: %d layers stored in %s, %.2f GB -> %.2f GB%s",
        name,
        report["layers"],
        precision,
        report["before"] / 1e9,
        report["after"] / 1e9,
        f" ({len(report['kept'])} kept in {dtype}: their sizes do not fit {precision})" if report["kept"] else "",
    )


def offload_cached(pipe, latents_cached: bool, captions_cached: bool, device: torch.device) -> tuple[str, ...]:
    """Move what training will not use to CPU memory; returns the components moved (for sampling)."""
    parked = parked_components(latents_cached, captions_cached)
    if device.type == OFFLOAD_DEVICE.type:
        return ()  # already in CPU memory
    for name in parked:
        getattr(pipe, name).to(OFFLOAD_DEVICE)
    if parked:
        log.info("offloaded to CPU memory until sampling: %s", ", ".join(parked))
    return parked


@contextlib.contextmanager
def on_device(pipe, components: Sequence[str], device: torch.device) -> Iterator[None]:
    """The offloaded ``components`` back for the block (sampling), and in CPU memory again after it.

    The VAE comes back for the whole block (it is small, and diffusers takes the pipeline's device from it);
    each text encoder only for its own forward, so the two never sit on the device together or beside the
    VAE's decode, the largest thing sampling does.
    """
    hooks = []
    for name in components:
        model = getattr(pipe, name)
        if name == "vae":
            model.to(device)
            continue
        hooks.append(model.register_forward_pre_hook(lambda module, args: module.to(device)))
        hooks.append(model.register_forward_hook(lambda module, args, output: module.to(OFFLOAD_DEVICE)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for name in components:
            getattr(pipe, name).to(OFFLOAD_DEVICE)
