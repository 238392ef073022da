"""How each SD front end merges a kohya LoRA / DoRA stem into a weight, reproduced op for op.

``dora-studio verify`` runs these next to our own ``merged_weight`` so a user sees what ComfyUI,
Forge, AUTOMATIC1111 and InvokeAI will actually compute from a file, including where they disagree
(output-axis DoRA, ``docs/adapter-format.md`` section 4). Each function follows the loader it names,
including its quirks; only the dtype is fixed to float32 so the comparison shows arithmetic, not
rounding. All take the file-shaped tensors of ``AdapterWeights`` and return a float32 weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from trainer.adapters.weights import AdapterWeights

FrontEndMerge = Callable[[Tensor, AdapterWeights, float], Tensor]


def _lora_diff(weights: AdapterWeights, shape: torch.Size) -> Tensor:
    """up @ down in float32, reshaped to the base weight (every loader flattens the same way)."""
    up = weights.up.float().flatten(start_dim=1)
    down = weights.down.float().flatten(start_dim=1)
    return torch.mm(up, down).reshape(shape)


def _input_column_norm(weight: Tensor) -> Tensor:
    """||.|| per input column over out and kernel dims, the expression all three loaders share."""
    return (
        weight.transpose(0, 1)
        .reshape(weight.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(weight.shape[1], *[1] * (weight.dim() - 1))
        .transpose(0, 1)
    )


def _output_row_norm(weight: Tensor) -> Tensor:
    """||.|| per output row, kept broadcastable against the weight."""
    return (
        weight.reshape(weight.shape[0], -1)
        .norm(dim=1, keepdim=True)
        .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    )


def comfyui_merge(base: Tensor, weights: AdapterWeights, strength: float) -> Tensor:
    """ComfyUI ``LoRAAdapter.calculate_weight`` + ``weight_decompose``; Forge runs a copy of it.

    Read: comfyanonymous/ComfyUI ``comfy/weight_adapter/lora.py`` and ``comfy/weight_adapter/base.py``
    (commit 9c0cf36c; output-axis branch from ComfyUI PR #7727), and lllyasviel/stable-diffusion-webui-forge
    ``backend/patcher/lora.py`` (commit cea9f37f, PR #2856 "Modified from ComfyUI ... base.py": same
    arithmetic, computation_dtype float32).
    - The weight is patched in float32 (model_patcher casts it before calculate_weight).
    - LoRA: ``W += (strength * alpha/r) * dW``.
    - DoRA axis is guessed from ``dora_scale.shape[0] == W.shape[0]``; on the output axis the norm is
      taken of the *base* weight W, not of V = W + gamma*dW, so output-axis files merge wrongly.
    - ``finfo(W.dtype).eps`` is *added* to the norm.
    - Strength: ``W + s * (W' - W)`` (skipped when s == 1).
    Older ComfyUI (before the output-axis branch, e.g. base.py at 14c20852) had no eps and always used
    the input-axis norm of V, i.e. it behaved like ``a1111_merge`` below.
    """
    weight = base.float().clone()
    lora_diff = _lora_diff(weights, weight.shape)
    alpha = weights.gamma
    if weights.dora_scale is None:
        return weight + (strength * alpha) * lora_diff
    dora_scale = weights.dora_scale.float()
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        weight_norm = _output_row_norm(weight)
    else:
        weight_norm = _input_column_norm(weight_calc)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def _rescale_columns(merged: Tensor, dora_scale: Tensor) -> Tensor:
    """V * (m / ||V||_col) with no eps: A1111 and InvokeAI apply this whatever the shape of m.

    An output-axis m of shape (out, 1[, 1, 1]) silently broadcasts against the (1, in[, 1, 1]) norm,
    which is the wrong weight docs/adapter-format.md section 4 warns about.
    """
    return merged * (dora_scale.float() / _input_column_norm(merged))


def a1111_merge(base: Tensor, weights: AdapterWeights, strength: float) -> Tensor:
    """AUTOMATIC1111 ``NetworkModule.finalize_updown`` + ``apply_weight_decompose``.

    Read: AUTOMATIC1111/stable-diffusion-webui ``extensions-builtin/Lora/network.py`` as changed by PRs
    #15160 and #15283 ("Use correct DoRA implementation", KohakuBlueleaf), and ``network_lora.py`` (ea903819).
    - ``updown = dW * alpha/r``; DoRA: ``updown = (W + updown) * (m / ||W + updown||_col) - W``:
      always the input-axis norm of V, no eps.
    - Strength (``multiplier()``) scales the final updown: ``W + s * updown``.
    - A1111 computes in ``devices.dtype`` (fp16 on most GPUs); here float32.
    """
    orig_weight = base.float()
    updown = _lora_diff(weights, orig_weight.shape) * weights.gamma
    if weights.dora_scale is not None:
        updown = _rescale_columns(updown + orig_weight, weights.dora_scale) - orig_weight
    return orig_weight + updown * strength


def invokeai_merge(base: Tensor, weights: AdapterWeights, strength: float) -> Tensor:
    """InvokeAI ``LoRALayer`` / ``DoRALayer.get_parameters`` applied by ``LayerPatcher``.

    Read: invoke-ai/InvokeAI ``invokeai/backend/patches/layers/lora_layer.py``, ``lora_layer_base.py``,
    ``dora_layer.py`` and ``invokeai/backend/patches/layer_patcher.py``.
    - LoRA: ``W + dW * (strength * alpha/r)``.
    - ``.dora_scale`` keys take the LyCORIS/kohya branch (``magnitude_is_out_dim`` is only set for
      PEFT ``dora_magnitude`` keys): ``V * (m / ||V||_col)``, no eps, whatever m's shape.
    - Strength: ``W + (W' - W) * strength``.
    - Direct patching casts the patch to float32 and adds it to W in W's dtype; here all float32.
    """
    orig_weight = base.float()
    delta_v = _lora_diff(weights, orig_weight.shape)
    if weights.dora_scale is None:
        return orig_weight + delta_v * (strength * weights.gamma)
    out_weight = _rescale_columns(orig_weight + delta_v * weights.gamma, weights.dora_scale)
    return orig_weight + (out_weight - orig_weight) * strength


# Forge's merge is ComfyUI's (see comfyui_merge); it is listed so users find their front end by name.
FRONT_ENDS: dict[str, FrontEndMerge] = {
    "ComfyUI": comfyui_merge,
    "Forge": comfyui_merge,
    "AUTOMATIC1111": a1111_merge,
    "InvokeAI": invokeai_merge,
}
