"""Injection on the real SDXL architecture (meta device) and the tiny model: counts, removal, merge."""

from __future__ import annotations

import pytest
from torch import nn

from trainer.adapters.injection import NetworkSpec, inject_adapters, remove_adapters, select_targets
from trainer.adapters.layers import AdapterSpec, DoRALayer, LoRALayer
from trainer.sdxl.configs import real_text_encoder_1, real_text_encoder_2, real_unet


@pytest.fixture(scope="module")
def real_models():
    return {"unet": real_unet(), "te1": real_text_encoder_1(), "te2": real_text_encoder_2()}


@pytest.mark.parametrize(
    "part,preset,expected",
    [
        ("unet", "attn", 722),
        ("unet", "attn+conv", 788),
        ("te1", "attn", 72),
        ("te2", "attn", 192),
    ],
)
def test_preset_counts_on_real_sdxl(real_models, part, preset, expected):
    model = real_models[part]
    before = dict(model.named_modules())
    adapters = inject_adapters(model, part, NetworkSpec(dora=True, rank=4, alpha=4), unet_targets=preset)
    try:
        assert len(adapters) == expected
        assert all(isinstance(layer, DoRALayer) for layer in adapters.values())
        groups = {id(layer.norm_group) for layer in adapters.values()}  # the part's norms are computed together
        assert len(groups) == 1 and next(iter(adapters.values())).norm_group.layers == list(adapters.values())
        assert sum(isinstance(m, LoRALayer) for m in model.modules()) == expected
    finally:
        assert remove_adapters(model) == expected
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_conv_rank_applies_to_spatial_kernels_only(real_models):
    unet = real_models["unet"]
    spec = NetworkSpec(dora=False, rank=8, alpha=4, conv_rank=2, conv_alpha=1)
    adapters = inject_adapters(unet, "unet", spec, unet_targets="attn+conv")
    try:
        conv3 = adapters["lora_unet_input_blocks_1_0_in_layers_2"]
        shortcut = adapters["lora_unet_output_blocks_0_0_skip_connection"]  # 1x1 conv
        time_proj = adapters["lora_unet_input_blocks_1_0_emb_layers_1"]
        assert (conv3.spec.rank, conv3.spec.alpha) == (2, 1)
        assert tuple(conv3.lora_down.shape[2:]) == (3, 3) and tuple(conv3.lora_up.shape[2:]) == (1, 1)
        assert (shortcut.spec.rank, time_proj.spec.rank) == (8, 8)
    finally:
        remove_adapters(unet)


def test_include_exclude_patterns(real_models):
    unet = real_models["unet"]
    only_attn2 = select_targets(unet, "unet", include=[r"attn2_to_(k|v)$"], exclude=[r"^lora_unet_middle_block"])
    assert only_attn2 and all(s.endswith(("attn2_to_k", "attn2_to_v")) for s in only_attn2)
    assert not any(s.startswith("lora_unet_middle_block") for s in only_attn2)


def test_removal_restores_requires_grad_flags():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].bias.requires_grad_(False)
    layer = DoRALayer(model[0], AdapterSpec(rank=2, alpha=2, dora=True))
    assert not layer.base.weight.requires_grad
    base = layer.restore_base()
    assert base.weight.requires_grad and not base.bias.requires_grad
