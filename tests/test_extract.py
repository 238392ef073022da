"""``dora-studio extract``: a fine-tune of the tiny model made here as a known DoRA change on a few layers is found
(exactly those layers), a DoRA of that rank reconstructs it where a LoRA of the same rank cannot, a LoRA's error
is Eckart-Young's; the file verifies; and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.adapters.dora_norm import weight_norm
from trainer.adapters.injection import target_module_paths
from trainer.adapters.low_rank import dora_from_target, factor_change
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.cli import main
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.extract import EXTRACT_KEY
from trainer.kohya.merge import model_stem_targets, pipeline_parts
from trainer.sdxl.model_files import export_pipeline, load_sdxl_pipeline
from trainer.sdxl.naming import stem_for

RANK = 2


def _dora_change(base: torch.Tensor, axis: str, seed: int) -> torch.Tensor:
    """The merged weight of a random DoRA of RANK over ``base``: a new direction and rescaled channels."""
    generator = torch.Generator().manual_seed(seed)
    conv = [1, 1] if base.dim() == 4 else []
    adapter = AdapterWeights(
        down=torch.randn(RANK, *base.shape[1:], generator=generator) * 0.2,
        up=torch.randn(base.shape[0], RANK, *conv, generator=generator) * 0.2,
        alpha=float(RANK),
    )
    norms = weight_norm(base, axis)
    adapter.dora_scale = norms * (torch.rand(norms.shape, generator=generator) + 0.5)
    return merged_weight(base, adapter)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_a_dora_target_is_recovered_where_a_lora_of_the_same_rank_is_not(axis):
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    target = _dora_change(base, axis, seed=2)
    dora, error = dora_from_target(base, target, RANK, axis, max_rounds=64)
    torch.testing.assert_close(dora.dora_scale, weight_norm(target, axis))  # the norms are the target's own
    lora, _ = factor_change(base, target, RANK, gamma=1.0)
    lora_error = float((merged_weight(base, lora) - target).norm() / (target - base).norm())
    assert error < 1e-5 and lora_error > 0.1


@pytest.fixture(scope="module")
def tuned_dir(tiny_dir, tmp_path_factory):
    """The tiny model with four UNet layers changed by a DoRA of RANK (input axis), as a diffusers folder."""
    pipe = load_sdxl_pipeline(tiny_dir)
    targets = model_stem_targets(pipeline_parts(pipe))
    paths = target_module_paths(pipe.unet, "unet", "attn+conv")
    chosen = [p for p in paths if "attn2.to_q" in p][:3] + [next(p for p in paths if p.endswith("conv1"))]
    stems = [stem_for("unet", path) for path in chosen]
    with torch.no_grad():
        for i, stem in enumerate(stems):
            weight = targets[stem].module.weight
            weight.copy_(_dora_change(weight.detach(), "input", seed=10 + i))
    return export_pipeline(pipe, tmp_path_factory.mktemp("tuned") / "tuned-sdxl"), stems


def test_extract_finds_the_changed_layers_and_a_dora_reconstructs_them(tiny_dir, tuned_dir, tmp_path, capsys):
    tuned, stems = tuned_dir
    dora_out, lora_out = tmp_path / "dora.safetensors", tmp_path / "lora.safetensors"
    args = ["extract", "--base", str(tiny_dir), "--tuned", str(tuned), "--rank", str(RANK), "--precision", "fp32"]
    assert main([*args, "--kind", "dora", "--out", str(dora_out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(layer["stem"] for layer in report["per_layer"]) == sorted(stems)
    assert report["error_max"] < 1e-3 and report["lora_error_mean"] > 0.1  # the same rank, two kinds
    assert main([*args, "--out", str(lora_out), "--json"]) == 0
    lora_report = json.loads(capsys.readouterr().out)
    base = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    changed = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tuned)))
    for layer in lora_report["per_layer"]:  # a LoRA's error is the singular values it drops (Eckart-Young)
        change = (changed[layer["stem"]].module.weight - base[layer["stem"]].module.weight).detach().double()
        s = torch.linalg.svdvals(change.flatten(1))
        assert layer["error"] == pytest.approx(float(s[RANK:].norm() / s.norm()), rel=1e-3)
    extracted = load_adapter(dora_out)
    assert json.loads(extracted.metadata[EXTRACT_KEY])["kind"] == "dora"
    assert {w.dora_axis for w in extracted.adapters.values()} == {"input"}
    assert main(["verify", str(dora_out), "--model", str(tiny_dir)]) == 0


@pytest.mark.parametrize("case", ["same-model", "rank-0"])
def test_extract_refuses_and_writes_nothing(case, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rank = "0" if case == "rank-0" else "2"
    assert main(["extract", "--base", str(tiny_dir), "--tuned", str(tiny_dir), "--rank", rank, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error:") and not out.exists()
