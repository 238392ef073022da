"""DoRA's training forward and backward as activation scaling, for Linear and Conv2d.

With the norm of V treated as a constant (the paper's section 4.3), W' = V * c with c = m / ||V||, so

    input axis:   y = V (c * x) + b        (c per input channel)
    output axis:  y = c * (V x) + b        (c per output channel)

and V x = W x + gamma * up(down(x)). Nothing weight-sized is built. Plain autograd would also save the
scaled input (input axis) or the unscaled output (output axis) for the magnitude gradient: one extra
activation per layer. These functions save only what LoRA saves (x and the rank-r hidden h) and get the
rest back in backward: the scaled input is recomputed from x (elementwise, cheap), the unscaled output is
taken from y itself, which the next op usually keeps anyway. Factors that are cheap to recompute (VeRA's) arrive
with a function that does, and are not saved either. Over a quantized base (``adapters.quantized``)
the weight arrives as a function that dequantizes it; it is called in forward and again in backward, so no
dequantized weight is kept between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    """A Linear's activations as 2-D rows (a vector is one row)."""
    return t.reshape(-1, t.shape[-1])


class LinearOps:
    """Linear as the DoRA functions need it: apply, and the input and weight gradients.

    The gradients take and give activations ``flat``: as 2-D rows, which a backward makes once for all its
    products rather than once per product (on small layers, such per-op overhead is most of the cost).
    """

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def flat(self, t: Tensor) -> Tensor:
        return _rows(t)

    def input_grad(self, x: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """sum_k dy_k @ w_k, accumulated in place by the GEMM (beta=1) instead of through temporaries."""
        (w0, dy0), *rest = pairs
        dx = dy0 @ w0
        for w, dy in rest:
            dx.addmm_(dy, w)
        return dx

    def weight_grad(self, x: Tensor, weight: Tensor, dy: Tensor) -> Tensor:
        return dy.T @ x

    def add_up(self, out: Tensor, h: Tensor, up: Tensor, alpha: float) -> Tensor:
        """out += alpha * up(h), accumulated by the GEMM itself (beta=1): no output-sized temporary.

        ``view``, not ``reshape``: a copy would take the update and lose it; a fresh F.linear output is contiguous.
        """
        out.view(-1, out.shape[-1]).addmm_(_rows(h), up.T, alpha=alpha)
        return out

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

    def flat(self, t: Tensor) -> Tensor:
        return t

    def _backward(self, x: Tensor, weight: Tensor, dy: Tensor, need_input: bool, need_weight: bool):
        return torch.ops.aten.convolution_backward(
            dy,
            x,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            1,
            [need_input, need_weight, False],
        )

    def input_grad(self, x: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        (w0, dy0), *rest = pairs
        dx = self._backward(x, w0, dy0, True, False)[0]
        for w, dy in rest:
            dx.add_(self._backward(x, w, dy, True, False)[0])
        return dx

    def weight_grad(self, x: Tensor, weight: Tensor, dy: Tensor) -> Tensor:
        return self._backward(x, weight, dy, False, True)[1]

    def add_up(self, out: Tensor, h: Tensor, up: Tensor, alpha: float) -> Tensor:
        """out += alpha * up(h) in place."""
        return out.add_(self.apply(h, up), alpha=alpha)

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, 1, 1)


Ops = LinearOps | ConvOps

# Positions of the differentiable inputs of both functions' forward(x, magnitude, norm, weight, bias, down, up, ...).
_X, _MAGNITUDE, _BIAS, _DOWN, _UP = 0, 1, 4, 5, 6


def _scale(ctx, magnitude: Tensor, norm: Tensor) -> Tensor:
    """c = m / ||V|| in the norm's dtype (float32), shaped like the norm; computed here rather than by autograd,
    which would add two nodes per layer (the division and the reshape) for what the backward does in one line."""
    ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
    return magnitude.reshape(norm.shape) / norm  # float32 whatever the magnitude's dtype: the division promotes


def _magnitude_grad(ctx, d_scale: Tensor, norm: Tensor) -> Tensor:
    """dL/dm = dL/dc / ||V||, the norm being a constant (the paper's section 4.3)."""
    return d_scale.div_(norm).reshape(ctx.magnitude_shape).to(ctx.magnitude_dtype)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce to the scale's shape, accumulating in float32 whatever the activation dtype."""
    return (t if t.dtype == torch.float32 else t.float()).sum_to_size(shape)


def _bias_grad(dy: Tensor, bias: Tensor, ops: Ops) -> Tensor:
    return dy.sum_to_size(ops.channel_shape(bias.shape[0])).reshape(bias.shape)


def _up_backward(ctx, dz: Tensor, up: Tensor, h: Tensor, rank_mask: Tensor | None, need_up: bool):
    """d(up) and d(h) from the flat gradient ``dz`` of V x = W x + gamma * up(h); d(h), flat, carries gamma and
    the mask (which broadcasts over h's own shape: per sample, not per row)."""
    up_ops, gamma = ctx.up_ops, ctx.gamma
    h_flat = up_ops.flat(h)
    d_up = up_ops.weight_grad(h_flat, up, dz).mul_(gamma) if need_up else None
    dh = up_ops.input_grad(h_flat, [(up, dz)]).mul_(gamma)
    if rank_mask is not None:
        dh.view(h.shape).mul_(rank_mask)
    return d_up, dh


def _dense(weight: Tensor | Callable[[], Tensor]) -> Tensor:
    """The base weight: a tensor, or (a quantized base) what dequantizes it for the moment it is used."""
    return weight() if callable(weight) else weight


def _saved_weight(ctx, weight: Tensor | Callable[[], Tensor]) -> Tensor | None:
    """What save_for_backward keeps of the weight: the tensor; a dequantizer is kept on ctx instead."""
    ctx.dequantize = weight if callable(weight) else None
    return None if callable(weight) else weight


def _weight_in_backward(ctx, saved: Tensor | None) -> Tensor:
    return saved if ctx.dequantize is None else ctx.dequantize()


def _saved_factors(ctx, down: Tensor, up: Tensor, factors: Callable[[], tuple[Tensor, Tensor]] | None):
    """What save_for_backward keeps of the factors: the tensors, or nothing when ``factors`` can compute them
    again (VeRA's, each a scaling of a shared matrix: at VeRA's ranks, keeping them for every layer between
    forward and backward would hold gigabytes on SDXL; recomputing them is one rank-sized multiply)."""
    ctx.factors = factors
    return (None, None) if factors is not None else (down, up)


def _factors_in_backward(ctx, down: Tensor | None, up: Tensor | None) -> tuple[Tensor, Tensor]:
    return (down, up) if ctx.factors is None else ctx.factors()


def _lora_forward(ctx, v_input: Tensor, weight, bias, down, up, gamma, rank_mask, ops, up_ops) -> Tensor:
    """V x + b = W x + b + gamma * up(mask * down(x)), saving the rank-r hidden for backward."""
    h = ops.apply(v_input, down)
    if rank_mask is not None:
        h = h * rank_mask
    out = up_ops.add_up(ops.apply(v_input, weight, bias), h, up, gamma)
    ctx.ops, ctx.up_ops, ctx.gamma = ops, up_ops, gamma
    return out, h


def _times(t: Tensor, scale: Tensor) -> Tensor:
    """t * scale in t's dtype (the scale is float32)."""
    return t * scale if t.dtype == scale.dtype else (t * scale).to(t.dtype)


class DoraInputAxis(torch.autograd.Function):
    """y = W (c*x) + gamma * up(down(c*x)) + b; saves x, not c*x.

    c*x is the same product as (W*c) x and (down*c) x, so the forward scales whichever is smaller: the
    activations, or the weight and the down factor (a weight-sized temporary, dropped after the layer's GEMMs:
    one pass over W instead of one over x; W is the smaller one at SDXL's larger sizes and on every small
    layer). The scaled input is not even recomputed in backward: the down weight's gradient is linear in each
    input channel, so d(down) = grad(x) * c, a rank-sized product.
    """

    @staticmethod
    def forward(
        ctx, x, magnitude, norm, weight, bias, down, up, gamma: float, rank_mask, ops: Ops, up_ops: Ops, factors=None
    ):
        scale = _scale(ctx, magnitude, norm)
        dense, v_input = _dense(weight), x
        if dense.numel() + down.numel() < x.numel():  # scale broadcasts over both weights' input channels (dim 1)
            dense, down_used = _times(dense, scale), _times(down, scale)
        else:
            v_input, down_used = _times(x, scale), down
        y, h = _lora_forward(ctx, v_input, dense, bias, down_used, up, gamma, rank_mask, ops, up_ops)
        saved = _saved_weight(ctx, weight), *_saved_factors(ctx, down, up, factors)
        ctx.save_for_backward(x, scale, norm, *saved, bias, h, rank_mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, norm, weight, down, up, bias, h, rank_mask = ctx.saved_tensors
        weight = _weight_in_backward(ctx, weight)
        down, up = _factors_in_backward(ctx, down, up)
        ops, needs = ctx.ops, ctx.needs_input_grad
        x_flat, dy = ops.flat(x), ops.flat(dy)
        d_up, dh = _up_backward(ctx, dy, up, h, rank_mask, needs[_UP])
        d_down = dx = d_magnitude = d_bias = None
        if needs[_DOWN]:  # scale broadcasts over down's input channels: (in,) on (r, in), (1, in, 1, 1) on 4-D
            d_down = ops.weight_grad(x_flat, down, dh)
            d_down = d_down.mul_(scale) if d_down.dtype == scale.dtype else (d_down * scale).to(down.dtype)
        if needs[_X] or needs[_MAGNITUDE]:
            d_scaled_x = ops.input_grad(x_flat, [(weight, dy), (down, dh)])
            if needs[_MAGNITUDE]:
                d_magnitude = _magnitude_grad(ctx, _sum_to(d_scaled_x * x_flat, scale.shape), norm)
            if needs[_X]:
                dx = d_scaled_x.mul_(scale) if d_scaled_x.dtype == scale.dtype else (d_scaled_x * scale).to(x.dtype)
                dx = dx.view(x.shape)
        if needs[_BIAS]:
            d_bias = _bias_grad(dy, bias, ops)
        return dx, d_magnitude, None, None, d_bias, d_down, d_up, None, None, None, None, None


class DoraOutputAxis(torch.autograd.Function):
    """y = c * (W x + gamma * up(down(x))) + b; the magnitude gradient is taken from y itself.

    c * (W x) = (c * W) x: the forward scales the output or, when they are smaller, W's and up's rows.

    dL/dc = sum dy * (y - b) / c = (sum dy*y - b * sum dy) / c, so nothing beyond y (which the next op
    usually keeps anyway) is saved and no output-sized temporary is built.
    """

    @staticmethod
    def forward(
        ctx, x, magnitude, norm, weight, bias, down, up, gamma: float, rank_mask, ops: Ops, up_ops: Ops, factors=None
    ):
        scale = _scale(ctx, magnitude, norm)
        dense = _dense(weight)
        out_ch, in_ch = dense.shape[:2]
        if dense.numel() + up.numel() < x.numel() // in_ch * out_ch:  # weights smaller than the output: scale them
            rows = scale.flatten()
            scaled_weight, scaled_up = (scaled_rows(rows, t).to(t.dtype) for t in (dense, up))
            y, h = _lora_forward(ctx, x, scaled_weight, bias, down, scaled_up, gamma, rank_mask, ops, up_ops)
        else:
            unscaled, h = _lora_forward(ctx, x, dense, None, down, up, gamma, rank_mask, ops, up_ops)
            y = unscaled.mul_(scale) if unscaled.dtype == scale.dtype else (unscaled * scale).to(unscaled.dtype)
            if bias is not None:
                y.add_(bias.reshape(ops.channel_shape(bias.shape[0])))
        saved = _saved_weight(ctx, weight), *_saved_factors(ctx, down, up, factors)
        ctx.save_for_backward(x, scale, norm, *saved, bias, h, rank_mask, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, norm, weight, down, up, bias, h, rank_mask, y = ctx.saved_tensors
        weight = _weight_in_backward(ctx, weight)
        down, up = _factors_in_backward(ctx, down, up)
        ops, needs = ctx.ops, ctx.needs_input_grad
        dy = ops.flat(dy)
        d_magnitude = d_bias = None
        dy_sum = _sum_to(dy, scale.shape) if needs[_MAGNITUDE] or needs[_BIAS] else None
        if needs[_MAGNITUDE]:
            shifted_sum = _sum_to(dy * ops.flat(y), scale.shape)
            if bias is not None:
                shifted_sum = shifted_sum - bias.float().reshape(scale.shape) * dy_sum
            # A channel whose magnitude is exactly 0 has lost its unscaled output; its m gets no gradient.
            d_scale = torch.where(scale == 0, 0.0, shifted_sum / torch.where(scale == 0, 1.0, scale))
            d_magnitude = _magnitude_grad(ctx, d_scale, norm)
        if needs[_BIAS]:
            d_bias = dy_sum.reshape(bias.shape).to(bias.dtype)
        d_unscaled = dy * scale if dy.dtype == scale.dtype else (dy * scale).to(dy.dtype)
        d_up, dh = _up_backward(ctx, d_unscaled, up, h, rank_mask, needs[_UP])
        x_flat = ops.flat(x)
        d_down = ops.weight_grad(x_flat, down, dh) if needs[_DOWN] else None
        dx = ops.input_grad(x_flat, [(weight, d_unscaled), (down, dh)]).view(x.shape) if needs[_X] else None
        return dx, d_magnitude, None, None, d_bias, d_down, d_up, None, None, None, None, None


def scaled_rows(vector: Tensor, matrix: Tensor) -> Tensor:
    """diag(vector) @ matrix, for a factor of any number of dims: VeRA's diag(d) A and diag(b) B."""
    return vector.reshape(-1, *[1] * (matrix.dim() - 1)) * matrix


def _vera_hidden(projected: Tensor, d: Tensor, rank_mask: Tensor | None, ops: Ops) -> Tensor:
    """mask * d * (A x): VeRA's rank-wide hidden, from A x."""
    h = projected * d.reshape(ops.channel_shape(d.shape[0]))
    return h if rank_mask is None else h * rank_mask


# Positions of VeraFunction's differentiable inputs in forward(x, weight, bias, d, b, ...).
_VERA_X, _VERA_BIAS, _VERA_D, _VERA_B = 0, 2, 3, 4


class VeraFunction(torch.autograd.Function):
    """VeRA: y = W x + b + gamma * up(mask * d * (A x)) with up = diag(b) B, A and B the shared projections.

    Worked in activation space: A x (rank-wide, per token) is scaled by d, so A is never scaled into a rank x
    width factor, and d's gradient is a rank-wide reduction over tokens instead of a weight-gradient product;
    up = diag(b) B is built in forward and again in backward, never kept. What is saved is x and A x, as LoRA
    saves x and its hidden. ``bases`` gives (A, B) sliced to the layer, in the compute dtype: views of the
    shared matrices in float32, so nothing weight- or factor-sized is held for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, d, b, gamma: float, rank_mask, ops: Ops, up_ops: Ops, bases):
        down_basis, up_basis = bases()
        projected = ops.apply(x, down_basis)  # A x
        h = _vera_hidden(projected, d, rank_mask, ops)
        y = up_ops.add_up(ops.apply(x, _dense(weight), bias), h, scaled_rows(b, up_basis), gamma)
        ctx.ops, ctx.up_ops, ctx.gamma, ctx.bases = ops, up_ops, gamma, bases
        ctx.save_for_backward(x, _saved_weight(ctx, weight), bias, d, b, projected, rank_mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, d, b, projected, rank_mask = ctx.saved_tensors
        down_basis, up_basis = ctx.bases()
        ops, needs = ctx.ops, ctx.needs_input_grad
        dy = ops.flat(dy)
        h, up = _vera_hidden(projected, d, rank_mask, ops), scaled_rows(b, up_basis)
        d_up, dh = _up_backward(ctx, dy, up, h, rank_mask, needs[_VERA_B])
        d_b = d_d = dx = d_bias = None
        if needs[_VERA_B]:  # db_o = sum_k dUp_ok B_ok: one (out x rank) product, as LoRA's d(up)
            d_b = (d_up * up_basis).flatten(1).sum(dim=1).to(b.dtype)
        d_scale = d.reshape(ops.channel_shape(d.shape[0]))
        if needs[_VERA_D]:  # dd_k = sum over tokens of dh_k * (A x)_k
            d_d = _sum_to(dh * ops.flat(projected), d_scale.shape).reshape(d.shape).to(d.dtype)
        if needs[_VERA_X]:
            weight = _weight_in_backward(ctx, weight)
            dx = ops.input_grad(ops.flat(x), [(weight, dy), (down_basis, dh.mul_(d_scale))]).view(x.shape)
        if needs[_VERA_BIAS]:
            d_bias = _bias_grad(dy, bias, ops)
        return dx, None, d_bias, d_d, d_b, None, None, None, None, None
