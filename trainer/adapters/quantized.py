"""Frozen base layers stored in fp8 or NF4, so LoRA and DoRA train over a quantized model (QLoRA, QDoRA).

The quantizers are torchao's, the library PyTorch maintains for this (QLoRA's NF4 in torchtune is the same
tensor), and both run on CPU and CUDA, so the tests and CI exercise the real thing:

- ``fp8``: ``Float8Tensor`` with one scale per output row (float8_e4m3fn storage, about half of bf16).
  A row scale rather than the plain cast of kohya's ``--fp8_base`` and diffusers' layerwise casting:
  SDXL's weights are mostly below e4m3's smallest normal number (2^-6), where a plain cast keeps 1-3 bits.
- ``nf4``: ``NF4Tensor``, QLoRA's 4-bit NormalFloat in blocks of 64 with double-quantized scales (about a
  quarter of bf16). bitsandbytes has faster CUDA kernels for the matmul, but dequantizing is all we need,
  and torchao's is portable.

A conv weight is stored flattened to (out, in * kh * kw), one row per output channel. Every read of the
weight dequantizes it into a temporary in the compute dtype: the forward, again in the backward (nothing
weight-sized is saved for backward), and the DoRA norm once per optimizer step. The modules subclass
``nn.Linear`` / ``nn.Conv2d`` so target selection sees them as what they were; they have no ``weight``
attribute, on purpose: read it with ``frozen_weight``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.optional_packages import import_optional

Precision = Literal["fp8", "nf4"]
PRECISIONS: tuple[Precision, ...] = ("fp8", "nf4")
NF4_BLOCK = 64  # QLoRA's block size
NF4_SCALER_BLOCK = 256  # QLoRA's block of double-quantized scales


def _torchao(feature: str):
    """torchao's quantized tensors; the warnings its CUDA-only extensions print on a CPU build are dropped."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import_optional("torchao", feature=feature)
        from torchao.quantization import Float8Tensor, PerRow
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return Float8Tensor, PerRow, to_nf4


class QuantizedWeight:
    """One frozen weight in fp8 or NF4; ``dequantize`` gives it back (a temporary) in its shape."""

    def __init__(self, weight: Tensor, precision: Precision) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown base precision {precision!r}; one of {', '.join(PRECISIONS)}")
        float8_tensor, per_row, to_nf4 = _torchao(f'base precision "{precision}"')
        self.precision, self.shape, self.dtype = precision, weight.shape, weight.dtype
        rows = weight.detach().reshape(weight.shape[0], -1)
        if precision == "fp8":
            self.storage = float8_tensor.from_hp(rows, float8_dtype=torch.float8_e4m3fn, granularity=per_row())
        else:
            blocks = rows.numel() // NF4_BLOCK
            self.storage = to_nf4(rows, block_size=NF4_BLOCK, scaler_block_size=math.gcd(blocks, NF4_SCALER_BLOCK))

    @staticmethod
    def stored_bytes(shape: torch.Size, dtype: torch.dtype, precision: Precision) -> int:
        """What ``nbytes`` will be, from the shape alone: fp8 codes and a float32 scale per row; NF4 half a
        byte per value, an int8 scale per block and a ``dtype`` factor per block of scales."""
        values, rows = math.prod(shape), shape[0]
        if precision == "fp8":
            return values + 4 * rows
        blocks, size = values // NF4_BLOCK, torch.empty((), dtype=dtype).element_size()
        return values // 2 + blocks + blocks // math.gcd(blocks, NF4_SCALER_BLOCK) * size + size

    @staticmethod
    def fits(weight: Tensor, precision: Precision) -> bool:
        """NF4 needs whole blocks of 64 values (every SDXL layer has them); fp8 takes any weight."""
        return precision == "fp8" or weight.numel() % NF4_BLOCK == 0

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        dense = self.storage.dequantize() if self.precision == "fp8" else _nf4_values(self.storage)
        return dense.reshape(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes the storage holds (codes and scales)."""
        if self.precision == "fp8":
            parts = (self.storage.qdata, self.storage.scale)
        else:
            names = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
            parts = tuple(getattr(self.storage, name) for name in names)
        return sum(part.numel() * part.element_size() for part in parts)


def _nf4_values(storage) -> Tensor:
    """An ``NF4Tensor``'s values, equal bit for bit to its ``get_original_weight()``, in one table lookup.

    Written here because torchao decodes with about ten passes over int64 temporaries, which made an NF4
    step on the SDXL UNet (CPU, 256 px) twice as slow as it needs to be: 16 ms against 7 ms for a 5120x1280
    weight. Each byte holds two 4-bit codes, so a 256-row table maps it to both values at once.
    """
    nf4 = storage.nf4  # the 16 NormalFloat values, in the original weight's dtype
    pairs = torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=1)  # byte -> (high code, low code)
    scalers = storage.dequantize_scalers(storage.quantized_scalers, storage.quantization_factor,
                                         storage.scaler_block_size)  # fmt: skip
    values = F.embedding(storage.quantized_data.int(), pairs).view(-1, storage.block_size)
    return values.mul_(scalers.to(values.dtype)[:, None])


class PlaceholderWeight(QuantizedWeight):
    """A stand-in with the storage's size and no values: what the memory estimate quantizes fake tensors to."""

    def __init__(self, weight: Tensor, precision: Precision) -> None:
        self.precision, self.shape, self.dtype = precision, weight.shape, weight.dtype
        nbytes = self.stored_bytes(weight.shape, weight.dtype, precision)
        self.storage = torch.empty(nbytes, dtype=torch.uint8, device=weight.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return torch.empty(self.shape, dtype=dtype or self.dtype, device=self.storage.device)

    def nbytes(self) -> int:
        return self.storage.numel()


def compute_dtype(x: Tensor, stored: torch.dtype) -> torch.dtype:
    """What a plain layer would compute in: autocast's dtype when it is on, else the weights' own."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return stored


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled where it is on (a no-op context otherwise: entering autocast costs per layer)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _FrozenQuantizedLayer(torch.autograd.Function):
    """y = layer(x) with the weight dequantized for the moment it is used; the backward dequantizes again.

    Only the input's gradient is computed (the weight and bias are frozen); for a conv the input is saved,
    as a plain conv saves it, and for a Linear nothing is.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear | QuantizedConv2d) -> Tensor:
        dtype = compute_dtype(x, layer.quantized.dtype)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        x = x.to(dtype)
        weight = layer.quantized.dequantize(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        if isinstance(layer, QuantizedConv2d):
            ctx.save_for_backward(x)
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
        ctx.in_shape = x.shape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        layer = ctx.layer
        weight = layer.quantized.dequantize(dy.dtype)
        if isinstance(layer, QuantizedConv2d):
            (x,) = ctx.saved_tensors
            dx = torch.ops.aten.convolution_backward(
                dy, x, weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        else:
            dx = (dy.flatten(0, -2) @ weight).reshape(ctx.in_shape)
        return dx.to(ctx.x_dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized."""

    def __init__(
        self, linear: nn.Linear, precision: Precision, device: torch.device, dtype: torch.dtype, storage=QuantizedWeight
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantized = storage(linear.weight.to(device, dtype), precision)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.to(device, dtype), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return _FrozenQuantizedLayer.apply(x, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.quantized.precision}"


class QuantizedConv2d(nn.Conv2d):
    """A frozen ``nn.Conv2d`` (groups 1, zero padding) whose weight is stored quantized."""

    def __init__(
        self, conv: nn.Conv2d, precision: Precision, device: torch.device, dtype: torch.dtype, storage=QuantizedWeight
    ) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self.transposed, self.output_padding, self.padding_mode = False, conv.output_padding, conv.padding_mode
        self.quantized = storage(conv.weight.to(device, dtype), precision)
        bias = None if conv.bias is None else nn.Parameter(conv.bias.to(device, dtype), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return _FrozenQuantizedLayer.apply(x, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.quantized.precision}"


QuantizedLayer = QuantizedLinear | QuantizedConv2d


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedConv2d))


def frozen_weight(module: nn.Linear | nn.Conv2d, dtype: torch.dtype | None = None) -> Tensor:
    """A layer's weight as a dense tensor: the parameter itself, or a dequantized temporary."""
    if is_quantized(module):
        return module.quantized.dequantize(dtype)
    weight = module.weight
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)


def weight_info(module: nn.Linear | nn.Conv2d) -> tuple[torch.Size, torch.dtype, torch.device]:
    """(shape, dtype, device) of a layer's weight, without dequantizing it."""
    if is_quantized(module):
        return module.quantized.shape, module.quantized.dtype, module.quantized.device
    return module.weight.shape, module.weight.dtype, module.weight.device


def _quantizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return not is_quantized(module)
    return (
        isinstance(module, nn.Conv2d)
        and not is_quantized(module)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


@torch.no_grad()
def quantize_frozen(
    model: nn.Module, precision: Precision, device: torch.device, dtype: torch.dtype, storage=QuantizedWeight
) -> dict:
    """Replace every Linear and Conv2d of ``model`` by its quantized twin on ``device``, one layer at a time.

    Each layer is moved and quantized alone, so the full-precision model never has to fit on the device.
    The rest of the model (norms, embeddings, biases) is left for the caller to move. ``storage``:
    ``PlaceholderWeight`` for the memory estimate. Returns what was done:
    ``layers`` quantized, ``kept`` (whose size NF4 cannot block), and bytes ``before`` (in ``dtype``) and
    ``after``.
    """
    report = {"layers": 0, "kept": [], "before": 0, "after": 0}
    for path, module in list(model.named_modules()):
        if not _quantizable(module):
            continue
        if not QuantizedWeight.fits(module.weight, precision):
            report["kept"].append(path)
            continue
        quantized_class = QuantizedLinear if isinstance(module, nn.Linear) else QuantizedConv2d
        replacement = quantized_class(module, precision, device, dtype, storage)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, replacement)
        report["layers"] += 1
        report["before"] += module.weight.numel() * torch.empty((), dtype=dtype).element_size()
        report["after"] += replacement.quantized.nbytes()
    return report


def dequantizer(base: nn.Module, dtype: torch.dtype, first: Tensor | None) -> Callable[[], Tensor]:
    """A quantized base weight as the DoRA autograd function reads it: dequantized at each call (forward,
    backward), except that the first call takes ``first``, the copy the norm has just made, if it made one.
    Once per optimizer step that saves one of DoRA's three dequantizations (on the CPU, where they are
    memory-bound, a few seconds per SDXL step)."""

    def weight() -> Tensor:
        nonlocal first
        if first is None:
            return frozen_weight(base, dtype)
        dense, first = first.to(dtype), None
        return dense

    return weight
