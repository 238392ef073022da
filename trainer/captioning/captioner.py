"""A transformers image-to-text model folder (BLIP, BLIP-2, GIT, Florence-2, ...) writing one sentence per image.

The folder is what ``save_pretrained`` writes (or a Hugging Face snapshot): ``config.json``, the weights and
the processor's files. Its ``model_type`` says whether transformers can generate text from an image with it:
the types ``AutoModelForImageTextToText`` maps (which, since transformers 5, holds BLIP's
``BlipForConditionalGeneration`` and GIT's ``GitForCausalLM`` beside the chat-style models). Code shipped
inside a model folder (``trust_remote_code``) is never run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from trainer.errors import ModelLoadError

from .options import CaptionerOptions


def _check_model_type(folder: Path) -> None:
    """Refuse, with the reason, a folder whose config is not an image-to-text type transformers knows."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:  # unknown model_type, code in the folder, a broken config.json
        raise ModelLoadError.at(
            folder / "config.json",
            f"transformers cannot read it ({error}); give a transformers image-to-text model folder that this "
            "transformers knows without running code from the folder (update transformers for newer models)",
        ) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelLoadError.at(
            folder,
            f"holds a {config.model_type!r} model ({', '.join(config.architectures or [])}), which does not "
            "write text from images; give an image-to-text model (BLIP, GIT, Florence-2, ...) or a WD14 tagger "
            "folder (model.onnx and selected_tags.csv)",
        )


def _device_and_dtype(device: str) -> tuple[torch.device, torch.dtype]:
    """CUDA when there is one (``auto``), in bfloat16 where the card has it (half the memory, and float32's
    range, so nothing overflows as it can in float16), else float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    place = torch.device(device)
    if place.type != "cuda":
        return place, torch.float32
    return place, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


class Captioner:
    """``caption`` gives each image one generated sentence (an empty list when the model wrote nothing)."""

    def __init__(self, folder: Path, options: CaptionerOptions, device: str = "auto", batch_size: int = 8) -> None:
        self.options, self.batch_size = options, batch_size
        _check_model_type(folder)
        self.device, self.dtype = _device_and_dtype(device)
        transformers.utils.logging.disable_progress_bar()  # its per-file loading bar is noise above ours
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                folder, dtype=self.dtype, local_files_only=True
            )
        except (OSError, ValueError) as error:  # missing weights or processor files, mismatched shapes
            raise ModelLoadError.at(
                folder, f"transformers cannot load the model or its processor ({error}); copy the whole folder"
            ) from None
        self.model.to(self.device).eval()
        self.description = f"{type(self.model).__name__} {folder} (on {self.device}, {str(self.dtype)[6:]})"

    def caption(self, images: list[Image.Image]) -> list[list[str]]:
        options = self.options
        text = [options.prompt] * len(images) if options.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(device=self.device, dtype=self.dtype)
        sampling = {"do_sample": True, "top_p": options.top_p} if options.sample else {"do_sample": False}
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, max_new_tokens=options.max_length, num_beams=options.beams, **sampling
            )
        sentences = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [[" ".join(sentence.split())] if sentence.strip() else [] for sentence in sentences]
