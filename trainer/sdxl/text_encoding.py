"""SDXL's caption encoding: both CLIP encoders' penultimate hidden states side by side, plus the pooled G.

The same computation as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (no clip skip), so
training conditions the UNet exactly as sampling and the front ends do. Written out here because the
pipeline's version runs under ``no_grad`` only via its caller and wraps CFG logic training does not need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def tokenize(tokenizer, captions: Sequence[str]) -> Tensor:
    """Token ids padded and truncated to the tokenizer's 77, as the pipeline does."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_captions(
    tokenizers: Sequence, text_encoders: Sequence[nn.Module], captions: Sequence[str], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(prompt_embeds [B, 77, 768+1280], pooled_embeds [B, 1280]) for SDXL's two encoders."""
    hidden_states = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        output = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled embedding comes first
            pooled = output[0]
        hidden_states.append(output.hidden_states[-2])
    if pooled is None:
        raise ValueError(
            "no text encoder returned a pooled embedding; is text_encoder_2 a CLIPTextModelWithProjection?"
        )
    return torch.cat(hidden_states, dim=-1), pooled
