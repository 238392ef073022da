"""DoRA's training forward and backward as activation scaling, for Linear and Conv2d.

With the norm of V treated as a constant (the paper's section 4.3), W' = V * c with c = m / ||V||, so

    input axis:   y = V (c * x) + b        (c per input channel)
    output axis:  y = c * (V x) + b        (c per output channel)

and V x = W x + gamma * up(down(x)). Nothing weight-sized is built. Plain autograd would also save the
scaled input (input axis) or the unscaled output (output axis) for the magnitude gradient: one extra
activation per layer. These functions save only what LoRA saves (x and the rank-r hidden h) and get the
rest back in backward: the scaled input is recomputed from x (elementwise, cheap), the unscaled output is
taken from y itself, which the next op usually keeps anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class LinearOps:
    """Linear as the DoRA functions need it: apply, and input/weight gradients on demand."""

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def grads(self, x: Tensor, weight: Tensor, dy: Tensor, need_input: bool, need_weight: bool):
        dx = dy @ weight if need_input else None
        dw = dy.flatten(0, -2).T @ x.flatten(0, -2) if need_weight else None
        return dx, dw

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        return (channels,)


@dataclass(frozen=True)
class ConvOps:
    """Conv2d (groups=1) with the base layer's stride, padding and dilation."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def grads(self, x: Tensor, weight: Tensor, dy: Tensor, need_input: bool, need_weight: bool):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, self.stride, self.padding, self.dilation,
            False, [0, 0], 1, [need_input, need_weight, False],
        )
        return dx, dw

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, 1, 1)


Ops = LinearOps | ConvOps


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce to the scale's shape, accumulating in float32 whatever the activation dtype."""
    return (t if t.dtype == torch.float32 else t.float()).sum_to_size(shape)


def _bias_grad(dy: Tensor, bias: Tensor, ops: Ops) -> Tensor:
    return dy.sum_to_size(ops.channel_shape(bias.shape[0])).reshape(bias.shape)


def _lora_backward(ctx, x_in: Tensor, dz: Tensor, weight, down, up, h, rank_mask, need_x: bool):
    """Shared tail of both axes: gradients of up, down and of V's input from d(V x)."""
    ops, up_ops, gamma = ctx.ops, ctx.up_ops, ctx.gamma
    dh, d_up = up_ops.grads(h, up, dz, True, ctx.needs_input_grad[5])
    dh = dh * (gamma if rank_mask is None else gamma * rank_mask)
    dx_lora, d_down = ops.grads(x_in, down, dh, need_x, ctx.needs_input_grad[4])
    dx = None
    if need_x:
        dx, _ = ops.grads(x_in, weight, dz, True, False)
        dx = dx + dx_lora
    if d_up is not None:
        d_up = d_up * gamma
    return dx, d_down, d_up


class DoraInputAxis(torch.autograd.Function):
    """y = W (c*x) + gamma * up(down(c*x)) + b; saves x, not c*x."""

    @staticmethod
    def forward(ctx, x, scale, weight, bias, down, up, gamma: float, rank_mask, ops: Ops, up_ops: Ops):
        scaled_x = (x * scale).to(x.dtype)
        h = ops.apply(scaled_x, down)
        if rank_mask is not None:
            h = h * rank_mask
        y = ops.apply(scaled_x, weight, bias)
        y = y + gamma * up_ops.apply(h, up)
        ctx.save_for_backward(x, scale, weight, bias, down, up, h, rank_mask)
        ctx.ops, ctx.up_ops, ctx.gamma = ops, up_ops, gamma
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight, bias, down, up, h, rank_mask = ctx.saved_tensors
        scaled_x = (x * scale).to(x.dtype)
        d_scaled_x, d_down, d_up = _lora_backward(
            ctx, scaled_x, dy, weight, down, up, h, rank_mask, ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        )
        dx = d_scale = d_bias = None
        if d_scaled_x is not None:
            if ctx.needs_input_grad[1]:
                d_scale = _sum_to(d_scaled_x * x, scale.shape)
            if ctx.needs_input_grad[0]:
                dx = (d_scaled_x * scale).to(x.dtype)
        if ctx.needs_input_grad[3]:
            d_bias = _bias_grad(dy, bias, ctx.ops)
        return dx, d_scale, None, d_bias, d_down, d_up, None, None, None, None


class DoraOutputAxis(torch.autograd.Function):
    """y = c * (W x + gamma * up(down(x))) + b; the unscaled output is recovered from y in backward."""

    @staticmethod
    def forward(ctx, x, scale, weight, bias, down, up, gamma: float, rank_mask, ops: Ops, up_ops: Ops):
        h = ops.apply(x, down)
        if rank_mask is not None:
            h = h * rank_mask
        unscaled = ops.apply(x, weight) + gamma * up_ops.apply(h, up)
        y = (unscaled * scale).to(unscaled.dtype)
        if bias is not None:
            y = y + bias.reshape(ops.channel_shape(bias.shape[0]))
        ctx.save_for_backward(x, scale, weight, bias, down, up, h, rank_mask, y)
        ctx.ops, ctx.up_ops, ctx.gamma = ops, up_ops, gamma
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight, bias, down, up, h, rank_mask, y = ctx.saved_tensors
        d_scale = d_bias = None
        if ctx.needs_input_grad[1]:
            shifted = y if bias is None else y - bias.reshape(ctx.ops.channel_shape(bias.shape[0]))
            # A channel whose magnitude is exactly 0 has lost its unscaled output; its m gets no gradient.
            safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            unscaled = torch.where(scale == 0, torch.zeros_like(shifted), shifted / safe_scale)
            d_scale = _sum_to(dy * unscaled, scale.shape)
        d_unscaled = (dy * scale).to(dy.dtype)
        dx, d_down, d_up = _lora_backward(
            ctx, x, d_unscaled, weight, down, up, h, rank_mask, ctx.needs_input_grad[0]
        )
        if ctx.needs_input_grad[3]:
            d_bias = _bias_grad(dy, bias, ctx.ops)
        return dx, d_scale, None, d_bias, d_down, d_up, None, None, None, None
