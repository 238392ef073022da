"""``training.compile``: a compiled network trains as the eager one does, and its DoRA norms follow each step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec, DoRALayer
from trainer.adapters.norm_group import DoRANormGroup
from trainer.adapters.vera import projections_for
from trainer.training.network import compile_unet

STEPS = 3
# Inductor fuses and reorders float32 arithmetic (and picks its own GEMM kernels): agreement to about 1e-5.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


class _Net(nn.Module):
    """Both DoRA axes, a LoRA layer and a conv, as a UNet mixes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(x)).flatten(2).transpose(1, 2)
        return self.c(F.gelu(self.b(F.gelu(self.a(h)))))


def _adapted(vera: bool = False) -> tuple[nn.Module, dict]:
    """The net with DoRA on both axes and LoRA (or, with ``vera``, DVoRA on both axes and VeRA)."""
    torch.manual_seed(0)
    net = _Net().requires_grad_(False)
    specs = {"conv": AdapterSpec(4, 4, dora=True, vera=vera), "a": AdapterSpec(4, 8, dora=True, vera=vera),
             "b": AdapterSpec(4, 4, dora=True, dora_axis="output", vera=vera),
             "c": AdapterSpec(4, 4, vera=vera)}  # fmt: skip
    projections = projections_for(0, [(4, 32, 32)]) if vera else None  # b's 32 inputs and a's 32 outputs
    layers = {name: make_adapter(getattr(net, name), spec, projections=projections) for name, spec in specs.items()}
    for name, layer in layers.items():
        setattr(net, name, layer)
        nn.init.normal_(layer.vera_b if vera else layer.lora_up, std=0.1)
    DoRANormGroup(layer for layer in layers.values() if isinstance(layer, DoRALayer))
    return net, {"unet": layers}


def _train(net: nn.Module, adapters: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    x, target = torch.randn(2, 3, 6, 6, generator=generator), torch.randn(2, 36, 8, generator=generator)
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(net(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, [p.detach().clone() for p in params]


@pytest.mark.parametrize("vera", [False, True], ids=["lora-dora", "vera-dvora"])
def test_compiled_training_matches_eager_and_compiles_once(vera):
    eager, eager_adapters = _adapted(vera)
    compiled, compiled_adapters = copy.deepcopy((eager, eager_adapters))
    compile_unet(compiled, compiled_adapters)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_losses, eager_params = _train(eager, eager_adapters)
    compiled_losses, compiled_params = _train(compiled, compiled_adapters)
    # the magnitudes and the adapters moved, so a norm left stale after a step would show here
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses), **TOLERANCE)
    for ours, theirs in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # the forward, after the pre-hook
    assert not torch._dynamo.utils.counters["recompiles"]
