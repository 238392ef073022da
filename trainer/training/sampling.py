"""Sample images during training, with the adapters merged exactly into the base weights.

Merged, each adapter layer runs as its bare base module, so a sample costs what the base model costs
and shows exactly what a front end that merges the saved file would draw. Every prompt has a fixed
seed, so the samples of successive epochs differ only by what the adapter learned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from trainer.adapters.layers import LoRALayer
from trainer.files import atomic_path
from trainer.runs.run_directory import PROMPTS_FILE, sample_image_name

from .sample_prompts import SamplePrompt


@dataclass(frozen=True)
class SampleDefaults:
    """What a prompt line leaves out."""

    width: int
    height: int
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0  # prompt i without --d uses seed + i: fixed across epochs, yet different per prompt


def resolve(prompt: SamplePrompt, index: int, defaults: SampleDefaults) -> dict:
    """The concrete values prompt ``index`` is drawn with, as written to prompts.json."""

    def pick(value, default):
        return default if value is None else value

    return {
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative_prompt,
        "width": pick(prompt.width, defaults.width),
        "height": pick(prompt.height, defaults.height),
        "steps": pick(prompt.steps, defaults.steps),
        "guidance_scale": pick(prompt.guidance_scale, defaults.guidance_scale),
        "seed": pick(prompt.seed, defaults.seed + index),
    }


def _generate(pipe, values: dict, device: torch.device) -> Image.Image:
    generator = torch.Generator(device=device).manual_seed(values["seed"])
    return pipe(
        prompt=values["prompt"],
        # None, not "", so the pipeline does what the model asks for an empty negative (SDXL: zeros).
        negative_prompt=values["negative_prompt"] or None,
        width=values["width"],
        height=values["height"],
        num_inference_steps=values["steps"],
        guidance_scale=values["guidance_scale"],
        generator=generator,
        output_type="pil",
    ).images[0]


@contextmanager
def eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Every module in eval mode (adapter dropout off) while inside; each module's own flag put back after,
    per module rather than per model, since a submodule the trainer keeps in eval (a frozen part) must stay so."""
    modes = {module: module.training for model in models for module in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def generate_samples(
    pipe,
    adapters: Mapping[str, LoRALayer],
    prompts: Sequence[SamplePrompt],
    defaults: SampleDefaults,
    out_dir: Path,
) -> list[Path]:
    """Draw ``out_dir/NN.png`` per prompt plus ``prompts.json``; returns the image paths.

    ``pipe`` is the training pipeline with ``adapters`` injected (empty: sample the base model). Its
    scheduler is used as is. Whatever happens, every adapter is unmerged (bit-exact) and every module's
    train/eval flag is put back, so training resumes exactly where it stopped. Over a quantized base the
    adapters cannot be merged, and run as they train (their eval forward computes the merged weight's output).
    """
    out_dir = Path(out_dir)
    models = [part for part in pipe.components.values() if isinstance(part, nn.Module)]
    merged: list[LoRALayer] = []
    try:
        with eval_mode(models):
            for layer in adapters.values():
                if layer.can_merge:
                    layer.merge(1.0)
                    merged.append(layer)
            pipe.set_progress_bar_config(disable=True)
            device = pipe.unet.device
            records, paths = [], []
            # no_grad rather than inference_mode: nothing made here may later be refused by autograd.
            with torch.no_grad():
                for index, prompt in enumerate(prompts):
                    values = resolve(prompt, index, defaults)
                    image = _generate(pipe, values, device)
                    path = out_dir / sample_image_name(index)
                    with atomic_path(path) as tmp:
                        image.save(tmp, format="PNG")
                    paths.append(path)
                    records.append({"file": path.name, **values})
            with atomic_path(out_dir / PROMPTS_FILE) as tmp:
                tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return paths
    finally:
        for layer in merged:
            layer.unmerge()
