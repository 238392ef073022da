"""LoRA and DoRA layers around a frozen nn.Linear or nn.Conv2d (VeRA's and DVoRA's build on them: ``adapters.vera``).

A layer owns its adapter parameters in the kohya file's shapes (so saving is a rename), knows how to
compute its merged weight, and can merge into / unmerge from the base exactly. DoRA is LoRA plus a
magnitude: it shares all of LoRA's plumbing and only changes the forward and the merge. VeRA only changes
where the two factors come from (``factors()``), so DVoRA is DoRA over VeRA's factors with no code of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .dora_autograd import ConvOps, DoraInputAxis, DoraOutputAxis, LinearOps, Ops
from .dora_norm import DORA_AXES, DoraAxis, direction_norm, dora_scale_shape, weight_norm_sq
from .quantized import autocast_off, compute_dtype, dequantizer, frozen_weight, is_quantized, weight_info
from .weights import NORM_EPS, AdapterWeights, merged_weight

if TYPE_CHECKING:
    from .norm_group import DoRANormGroup

AdaptableModule = nn.Linear | nn.Conv2d


@dataclass(frozen=True)
class AdapterSpec:
    """What to attach to one layer."""

    rank: int
    alpha: float
    dora: bool = False
    dora_axis: DoraAxis = "input"
    module_dropout: float = 0.0  # probability of skipping the whole adapter for a training step
    rank_dropout: float = 0.0  # probability of zeroing each rank channel per sample (kohya semantics)
    vera: bool = False  # factors from shared random projections (VeRA; with dora, DVoRA): adapters.vera
    vera_d_initial: float = 0.1  # VeRA's d starts here (b starts at zero), as in PEFT

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.dora_axis not in DORA_AXES:
            raise ValueError(f"dora_axis must be one of {DORA_AXES}, got {self.dora_axis!r}")
        for name in ("module_dropout", "rank_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def _ops_for(base: AdaptableModule) -> tuple[Ops, Ops]:
    """Ops for the base/down path and for the up path (a 1x1 conv for convolutions)."""
    if isinstance(base, nn.Linear):
        return LinearOps(), LinearOps()
    if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
        raise ValueError(
            f"Conv2d with groups={base.groups}, padding={base.padding!r}, padding_mode={base.padding_mode!r} "
            "is not supported: adapters need groups=1 and numeric zero padding"
        )
    return ConvOps(base.stride, base.padding, base.dilation), ConvOps()


class LoRALayer(nn.Module):
    """y = base(x) + (alpha/r) * up(down(x)); up starts at zero so a fresh adapter is the identity."""

    def __init__(self, base: AdaptableModule, spec: AdapterSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and nn.Conv2d")
        self.base = base
        self.spec = spec
        self.ops, self.up_ops = _ops_for(base)
        # Remembered so that restore_base() hands the module back exactly as it was found.
        self._base_requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        base.requires_grad_(False)
        (out_ch, in_ch, *kernel), _, device = weight_info(base)
        rank = spec.rank
        factory = dict(device=device, dtype=dtype)
        down_shape = (rank, in_ch, *kernel)
        up_shape = (out_ch, rank) if not kernel else (out_ch, rank, 1, 1)
        self.down_shape, self.up_shape = down_shape, up_shape
        self._make_factors(factory)
        self._merged_from: Tensor | None = None

    def _make_factors(self, factory: dict) -> None:
        """The trainable parameters the factors come from: here the factors themselves."""
        self.lora_down = nn.Parameter(torch.empty(self.down_shape, **factory))
        self.lora_up = nn.Parameter(torch.zeros(self.up_shape, **factory))
        # Same init as kohya, LyCORIS and PEFT (nn.Linear's default), so learning rates transfer.
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(down, up) in the file's shapes, differentiable: the update is gamma * up @ down."""
        return self.lora_down, self.lora_up

    def _factor_parameters(self) -> tuple[Tensor, Tensor]:
        """What the factors are computed from: an optimizer step changes these (their version counters).

        Read from the module's own dict: DoRA checks them per layer per forward, and nn.Module's attribute
        lookup is ten times slower (on the tiny UNet, milliseconds a step)."""
        params = self._parameters
        return params["lora_down"], params["lora_up"]

    def _factors_again(self, dtype: torch.dtype) -> Callable[[], tuple[Tensor, Tensor]] | None:
        """How DoRA's backward gets the factors without keeping them from the forward; None: keep them (they are
        the parameters themselves, nothing extra)."""
        return None

    @torch.no_grad()
    def _load_factors(self, down: Tensor, up: Tensor) -> None:
        for name, tensor in (("lora_down", down), ("lora_up", up)):
            target = getattr(self, name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{name} shape {tuple(tensor.shape)} does not fit this layer's {tuple(target.shape)}")
            target.copy_(tensor)

    @property
    def gamma(self) -> float:
        return self.spec.alpha / self.spec.rank

    @property
    def merged(self) -> bool:
        return self._merged_from is not None

    def _skip_adapter(self) -> bool:
        return self.merged or (
            self.training and self.spec.module_dropout > 0 and torch.rand(()) < self.spec.module_dropout
        )

    def _rank_mask_and_gamma(self, x: Tensor) -> tuple[Tensor | None, float]:
        """kohya's rank dropout: a per-sample mask over rank channels, rescaled to keep the mean."""
        p = self.spec.rank_dropout
        if not self.training or p == 0:
            return None, self.gamma
        keep = torch.rand(x.shape[0], self.spec.rank, device=x.device) >= p
        shape = (
            (x.shape[0], *([1] * (x.dim() - 2)), self.spec.rank)
            if isinstance(self.ops, LinearOps)
            else (x.shape[0], self.spec.rank, 1, 1)
        )
        return keep.reshape(shape).to(x.dtype), self.gamma / (1 - p)

    def _compute_operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x, down, up in the dtype the base runs in (autocast's when active), as autocast would pick."""
        dtype = compute_dtype(x, weight_info(self.base)[1])
        down, up = self.factors()
        return x.to(dtype), down.to(dtype), up.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._skip_adapter():
            return self.base(x)
        rank_mask, gamma = self._rank_mask_and_gamma(x)
        x_c, down, up = self._compute_operands(x)
        hidden = self.ops.apply(x_c, down)
        if rank_mask is not None:
            hidden = hidden * rank_mask
        # base(x) + gamma * up(hidden) accumulated into the base's output, as DoRA's forward does, rather than
        # through two output-sized temporaries. A Linear's base runs on 2-D rows: on 3-D input F.linear returns
        # a view, and an in-place update of a view makes autograd copy the gradient in backward.
        if isinstance(self.ops, ConvOps):
            return self.up_ops.add_up(self.base(x), hidden, up, gamma)
        rows = self.up_ops.add_up(self.base(x.reshape(-1, x.shape[-1])), hidden, up, gamma)
        return rows.view(*x.shape[:-1], rows.shape[-1])

    def _frozen_operands(self, dtype: torch.dtype, base_read: Tensor | None = None) -> tuple:
        """The base weight as the autograd functions take it (over a quantized base: what dequantizes it, in
        forward and again in backward, starting from ``base_read`` if the norm just made one) and its bias."""
        bias = self.base.bias
        if is_quantized(self.base):
            weight = dequantizer(self.base, dtype, first=base_read)
        else:
            weight = frozen_weight(self.base, dtype)
        return weight, bias if bias is None or bias.dtype == dtype else bias.to(dtype)

    # -- weights and merging -------------------------------------------------------------------

    def to_weights(self) -> AdapterWeights:
        """The adapter as the file stores it (detached)."""
        down, up = self.factors()
        return AdapterWeights(down=down.detach(), up=up.detach(), alpha=float(self.spec.alpha))

    @torch.no_grad()
    def load_weights(self, weights: AdapterWeights) -> None:
        """Copy tensors from a file into this layer, refusing any shape or kind mismatch."""
        if weights.is_dora != isinstance(self, DoRALayer):
            kind = "DoRA" if weights.is_dora else "LoRA"
            raise ValueError(f"file holds {kind} weights but this layer is {type(self).__name__}")
        self._load_factors(weights.down, weights.up)
        if not math.isclose(weights.alpha, self.spec.alpha, rel_tol=1e-6):
            raise ValueError(f"alpha {weights.alpha} differs from this layer's {self.spec.alpha}")

    def merged_weight(self, strength: float = 1.0) -> Tensor:
        """W + s * (W' - W) in the base's dtype, computed in float32; the layer is not touched.

        Over a quantized base, W is the dequantized weight: what training saw.
        """
        _, dtype, device = weight_info(self.base)
        base = self._merged_from if self._merged_from is not None else frozen_weight(self.base)
        return merged_weight(base.to(device), self.to_weights(), strength).to(dtype)

    @property
    def can_merge(self) -> bool:
        """A quantized base cannot hold a merged weight without rounding the adapter away."""
        return not is_quantized(self.base)

    @torch.no_grad()
    def merge(self, strength: float = 1.0) -> None:
        """Write the merged weight into the base; keep the original on the CPU so unmerge is exact."""
        if self.merged:
            raise RuntimeError("adapter is already merged; unmerge() first")
        if not self.can_merge:
            raise RuntimeError("cannot merge into a quantized base; run the adapter unmerged instead")
        merged = self.merged_weight(strength)
        self._merged_from = self.base.weight.detach().to("cpu", copy=True)
        self.base.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if self._merged_from is None:
            raise RuntimeError("adapter is not merged")
        self.base.weight.copy_(self._merged_from)
        self._merged_from = None

    def restore_base(self) -> AdaptableModule:
        """Unmerge if needed and return the base module with its original requires_grad flags."""
        if self.merged:
            self.unmerge()
        for name, param in self.base.named_parameters():
            param.requires_grad_(self._base_requires_grad[name])
        return self.base


class DoRALayer(LoRALayer):
    """DoRA: W' = V * m / ||V|| with V = W + gamma * up @ down, m learned per input column or output row."""

    def __init__(self, base: AdaptableModule, spec: AdapterSpec, dtype: torch.dtype = torch.float32):
        super().__init__(base, spec, dtype)
        axis = spec.dora_axis
        # ||W||^2 never changes during training; cached once, in float32, as the norm identity needs it.
        # Over a quantized base it is the dequantized weight's, so a fresh adapter is the quantized model.
        self.register_buffer("weight_norm_sq", weight_norm_sq(frozen_weight(base), axis), persistent=False)
        # Magnitude starts at ||W|| (from the same cached sum the forward uses), so a fresh adapter is exact.
        magnitude = self.weight_norm_sq.sqrt().reshape(dora_scale_shape(tuple(weight_info(base)[0]), axis))
        self.dora_scale = nn.Parameter(magnitude.clone())
        self._norm_cache_key: tuple | None = None
        self._norm_cache: Tensor | None = None
        self.norm_group: DoRANormGroup | None = None  # set by DoRANormGroup; not a submodule

    def direction_norm(self) -> Tensor:
        """||V|| along the axis, float32, detached, floored at eps, shaped to broadcast like the scale.

        Detached as in the paper (section 4.3): treating ||V|| as a constant in backward saves its gradient
        path (and memory) and barely changes what is learned. Cached on the tensors' version counters, so it
        is computed once per optimizer step, not per micro-batch or per gradient-checkpoint recompute.
        """
        return self._norm_and_base_read()[0]

    def _norm_and_base_read(self) -> tuple[Tensor, Tensor | None]:
        """``direction_norm``, and the base weight it read when it was computed just now (None when cached):
        over a quantized base, a dequantized copy the forward can use instead of making another."""
        key = self._norm_key()
        if key == self._norm_cache_key:
            return self._norm_cache, None
        if self.norm_group is not None and not is_quantized(self.base):
            self.norm_group.refresh()  # this layer's norm, with every other stale one of its group
            return self._norm_cache, None
        weight = frozen_weight(self.base)  # over a quantized base: dequantized, for this computation only
        with torch.no_grad():
            down, up = self.factors()
        norm = direction_norm(weight, self.weight_norm_sq, down, up, self.gamma, self.spec.dora_axis)
        self._keep_norm(norm.clamp_min_(NORM_EPS), key)
        return self._norm_cache, weight

    def _norm_key(self) -> tuple:
        """What the norm depends on: the adapter tensors (an optimizer step bumps their versions) and the base."""
        first, second = self._factor_parameters()
        base = self._modules["base"]  # as in _factor_parameters: this runs per layer per forward
        if is_quantized(base):  # a quantized base never changes
            return first._version, second._version, first.data_ptr(), second.data_ptr(), id(base.quantized)
        weight = base._parameters["weight"]  # a plain one does when merged into
        return first._version, second._version, weight._version, first.data_ptr(), second.data_ptr(), weight.data_ptr()

    def _keep_norm(self, norm: Tensor, key: tuple) -> None:
        """Cache ||V|| (already floored at eps) for the adapter and base state ``key`` describes."""
        # Straight into the instance dict, as nn.Module.__setattr__ would put them after its checks for
        # parameters, buffers and modules (a few microseconds per layer per step).
        self.__dict__.update(_norm_cache=norm.reshape(self._scale_shape), _norm_cache_key=key)

    @property
    def _scale_shape(self) -> tuple[int, ...]:
        """The magnitude shaped to broadcast over activations: one value per input or output channel."""
        return self.ops.channel_shape(self.dora_scale.numel())

    def forward(self, x: Tensor) -> Tensor:
        if self._skip_adapter():
            return self.base(x)
        rank_mask, gamma = self._rank_mask_and_gamma(x)
        x_c, down, up = self._compute_operands(x)
        if torch.compiler.is_compiling():  # the cache check would split the graph: refresh_norms ran before
            if self._norm_cache is None:
                raise RuntimeError("a compiled forward needs refresh_norms(layers) first: no DoRA norm is cached")
            norm, base_read = self._norm_cache, None
        else:
            norm, base_read = self._norm_and_base_read()
        weight, bias = self._frozen_operands(x_c.dtype, base_read)
        function = DoraInputAxis if self.spec.dora_axis == "input" else DoraOutputAxis
        with autocast_off(x.device.type):
            return function.apply(
                x_c,
                self.dora_scale,
                norm,
                weight,
                bias,
                down,
                up,
                gamma,
                rank_mask,
                self.ops,
                self.up_ops,
                self._factors_again(x_c.dtype),
            )

    def to_weights(self) -> AdapterWeights:
        weights = super().to_weights()
        weights.dora_scale = self.dora_scale.detach()
        return weights

    @torch.no_grad()
    def load_weights(self, weights: AdapterWeights) -> None:
        if weights.dora_axis not in (None, self.spec.dora_axis):
            raise ValueError(f"file has {weights.dora_axis}-axis DoRA but this layer is {self.spec.dora_axis}-axis")
        super().load_weights(weights)
        if tuple(weights.dora_scale.shape) != tuple(self.dora_scale.shape):
            raise ValueError(
                f"dora_scale shape {tuple(weights.dora_scale.shape)} does not fit {tuple(self.dora_scale.shape)}"
            )
        self.dora_scale.copy_(weights.dora_scale)
