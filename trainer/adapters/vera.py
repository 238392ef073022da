"""VeRA (Kopiczko et al. 2024) and DVoRA (the DoRA paper's DoRA over VeRA): shared random projections, and the
layers that slice their factors from them.

VeRA keeps one frozen pair of random matrices A (r x in) and B (out x r) for a whole model and trains, per layer,
only two vectors: d over the rank and b over the outputs. A layer's update is ``diag(b) B diag(d) A``, i.e. a
LoRA update with ``up = diag(b) B`` and ``down = diag(d) A``: that is how the layers compute it and how the file
stores it, so every front end loads the result as a plain LoRA (VeRA) or DoRA (DVoRA) file.

The matrices are drawn exactly as PEFT's VeRA draws them (``peft.tuners.vera.model._kaiming_init``: a CPU
generator seeded with the seed, A first, then B, Kaiming-uniform with gain sqrt(2)), so the same seed and
sizes give PEFT's matrices bit for bit. A layer smaller than the largest takes the top-left slice, as PEFT does;
a convolution's kernel is flattened to (in * kh * kw) first. The file records the seed, the sizes and a digest
of the matrices, so they can be rebuilt and checked (``SharedProjections.rebuild``) rather than trusted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .dora_autograd import VeraFunction, scaled_rows
from .layers import AdaptableModule, AdapterSpec, DoRALayer, LoRALayer
from .quantized import autocast_off, compute_dtype, weight_info

# What the file records of each part's projections (the ``dora_studio.vera`` metadata, trainer.kohya.metadata).
PROJECTION_FIELDS = ("seed", "rank", "in_features", "out_features", "sha256")
# How far a file's factors may be from exact row scalings of the projections: an fp16 file rounds at ~1e-3.
LOAD_TOLERANCE = 1e-2


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's ``_kaiming_init``: uniform(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class SharedProjections(nn.Module):
    """The frozen A (rank x in_features) and B (out_features x rank) of one model part, from ``seed``.

    A module so that moving the model moves them; its buffers are not persistent (a model's state dict does
    not carry them: they are rebuilt from the seed). Every VeRA layer of the part holds the same instance.
    """

    def __init__(self, seed: int, rank: int, in_features: int, out_features: int):
        super().__init__()
        self.seed, self.rank = seed, rank
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((rank, in_features), generator), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((out_features, rank), generator), persistent=False)

    @property
    def in_features(self) -> int:
        return self.vera_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.vera_B.shape[0]

    def down_basis(self, rank: int, down_shape: tuple[int, ...]) -> Tensor:
        """The slice of A a layer's down factor scales: (rank, in[, kh, kw])."""
        flat = math.prod(down_shape[1:])
        return self.vera_A[:rank, :flat].reshape(down_shape)

    def up_basis(self, rank: int, up_shape: tuple[int, ...]) -> Tensor:
        """The slice of B a layer's up factor scales: (out, rank[, 1, 1])."""
        return self.vera_B[: up_shape[0], :rank].reshape(up_shape)

    def fits(self, rank: int, down_shape: tuple[int, ...], out_features: int) -> bool:
        return rank <= self.rank and math.prod(down_shape[1:]) <= self.in_features and out_features <= self.out_features

    def describe(self) -> dict[str, int | str]:
        """What the file records: enough to rebuild the matrices, and their digest to check the rebuild."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "sha256": projection_digest(self.vera_A, self.vera_B),
        }

    @classmethod
    def rebuild(cls, recorded: Mapping[str, object]) -> SharedProjections:
        """The projections a file's record describes, refusing (ValueError, with the reason) any that differ."""
        missing = [name for name in PROJECTION_FIELDS if name not in recorded]
        if missing:
            raise ValueError(f"the VeRA record lacks {', '.join(missing)}")
        sizes = {name: recorded[name] for name in ("seed", "rank", "in_features", "out_features")}
        if not all(isinstance(value, int) and value >= 0 for value in sizes.values()):
            raise ValueError(f"the VeRA record's seed and sizes must be non-negative integers, got {sizes}")
        projections = cls(**sizes)
        if projection_digest(projections.vera_A, projections.vera_B) != recorded["sha256"]:
            raise ValueError(
                f"seed {sizes['seed']} no longer gives the matrices the file was trained with (their digest "
                "differs): the record was edited, or this PyTorch draws random numbers differently"
            )
        return projections


def projection_digest(a: Tensor, b: Tensor) -> str:
    """sha256 of A's and B's float32 bytes: a rebuilt pair is the trained one only if this matches."""
    digest = hashlib.sha256()
    for tensor in (a, b):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def projections_for(
    seed: int, layers: list[tuple[int, int, int]], device: torch.device | None = None
) -> SharedProjections:
    """The smallest projections every layer (rank, in_features with the kernel flattened in, out_features) can
    slice its factors from: PEFT's sizing, the largest of each."""
    rank, in_features, out_features = (max(sizes) for sizes in zip(*layers))
    return SharedProjections(seed, rank, in_features, out_features).to(device)


def recover_vectors(
    down: Tensor, up: Tensor, down_basis: Tensor, up_basis: Tensor, tolerance: float
) -> tuple[Tensor, Tensor]:
    """(d, b) with down = diag(d) A and up = diag(b) B, by least squares row by row; ValueError when the file's
    factors are not such rows of the rebuilt matrices (relative residual above ``tolerance``)."""
    vectors = []
    for name, factor, basis in (("lora_down", down, down_basis), ("lora_up", up, up_basis)):
        rows, basis_rows = factor.float().flatten(1), basis.float().flatten(1)
        if rows.shape != basis_rows.shape:
            raise ValueError(f"{name} has shape {tuple(factor.shape)}, the projections give {tuple(basis.shape)}")
        scale = (rows * basis_rows).sum(dim=1) / basis_rows.square().sum(dim=1).clamp_min(1e-30)
        residual = (rows - scale[:, None] * basis_rows).norm() / rows.norm().clamp_min(1e-30)
        if residual > tolerance:
            raise ValueError(
                f"{name} is not a row scaling of the rebuilt VeRA projection (relative residual {residual:.2e} > "
                f"{tolerance:g}): the file's factors were changed after training, or come from other matrices"
            )
        vectors.append(scale)
    return vectors[0], vectors[1]


class VeRALayer(LoRALayer):
    """VeRA: the factors are ``down = diag(d) A`` and ``up = diag(b) B``, slices of the part's shared frozen
    projections (``adapters.vera``); only d (over the rank) and b (over the outputs) train. b starts at zero,
    so a fresh adapter is the identity. The forward works in activation space (``VeraFunction``); the file,
    merging and DoRA's magnitude (``DVoRALayer``: DoRA's forward and once-per-step norm) take the factors as
    LoRA's, rank-sized and never kept from forward to backward.
    """

    def __init__(
        self,
        base: AdaptableModule,
        spec: AdapterSpec,
        projections: SharedProjections,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(base, spec, dtype)
        if not projections.fits(spec.rank, self.down_shape, self.up_shape[0]):
            raise ValueError(
                f"shared projections of rank {projections.rank}, {projections.in_features} in, "
                f"{projections.out_features} out are too small for a rank-{spec.rank} layer of {self.down_shape}"
            )
        self.vera_projections = projections  # the same module in every layer of the part

    def _make_factors(self, factory: dict) -> None:
        self.vera_d = nn.Parameter(torch.full((self.spec.rank,), self.spec.vera_d_initial, **factory))
        self.vera_b = nn.Parameter(torch.zeros(self.up_shape[0], **factory))

    def _bases(self) -> tuple[Tensor, Tensor]:
        projections = self.vera_projections
        return projections.down_basis(self.spec.rank, self.down_shape), projections.up_basis(
            self.spec.rank, self.up_shape
        )

    def factors(self) -> tuple[Tensor, Tensor]:
        down_basis, up_basis = self._bases()
        return scaled_rows(self.vera_d, down_basis), scaled_rows(self.vera_b, up_basis)

    def _factor_parameters(self) -> tuple[Tensor, Tensor]:
        params = self._parameters
        return params["vera_d"], params["vera_b"]

    def forward(self, x: Tensor) -> Tensor:
        """LoRA's forward in VeRA's own terms (``VeraFunction``): nothing factor-sized is built or kept for A."""
        if self._skip_adapter():
            return self.base(x)
        rank_mask, gamma = self._rank_mask_and_gamma(x)
        dtype = compute_dtype(x, weight_info(self.base)[1])
        weight, bias = self._frozen_operands(dtype)

        def bases() -> tuple[Tensor, Tensor]:
            down_basis, up_basis = self._bases()
            return down_basis.to(dtype), up_basis.to(dtype)

        d, b = self.vera_d.to(dtype), self.vera_b.to(dtype)
        with autocast_off(x.device.type):
            return VeraFunction.apply(x.to(dtype), weight, bias, d, b, gamma, rank_mask, self.ops, self.up_ops, bases)

    def _factors_again(self, dtype: torch.dtype) -> Callable[[], tuple[Tensor, Tensor]]:
        @torch.no_grad()
        def factors() -> tuple[Tensor, Tensor]:  # the same arithmetic as the forward's, so the same values
            down, up = self.factors()
            return down.to(dtype), up.to(dtype)

        return factors

    @torch.no_grad()
    def _load_factors(self, down: Tensor, up: Tensor) -> None:
        """d and b back from a file's factors; refused when they are not scaled rows of this layer's projections."""
        d, b = recover_vectors(down, up, *self._bases(), tolerance=LOAD_TOLERANCE)
        self.vera_d.copy_(d)
        self.vera_b.copy_(b)


class DVoRALayer(VeRALayer, DoRALayer):
    """DVoRA (the DoRA paper, section 5.3): DoRA's magnitude over VeRA's factors."""

    forward = DoRALayer.forward  # DoRA's, which computes the factors again in backward too
