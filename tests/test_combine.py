"""``dora-studio combine``: weighted LoRA and DoRA files folded into one, checked against the weighted sum of their
merged weights computed here; exact where the summed change fits the rank; DoRA's magnitudes the target's own
norms; the record; and the inputs it refuses without writing."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.cli import main
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.combine import COMBINE_KEY, parse_source
from trainer.kohya.merge import model_stem_targets, pipeline_parts
from trainer.sdxl.model_files import load_sdxl_pipeline


def _targets(tiny_dir):
    return model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))


def _second_file(path, first: dict[str, AdapterWeights], dora: bool) -> dict[str, AdapterWeights]:
    """Another adapter over all but the first of ``first``'s layers, with other random factors (rank 3)."""
    from trainer.kohya.adapter_file import save_adapter

    generator = torch.Generator().manual_seed(11)
    adapters = {}
    for stem, weights in list(first.items())[1:]:
        conv = [1, 1] if weights.down.dim() == 4 else []
        adapters[stem] = AdapterWeights(
            down=torch.randn(3, *weights.down.shape[1:], generator=generator) * 0.1,
            up=torch.randn(weights.up.shape[0], 3, *conv, generator=generator) * 0.1,
            alpha=3.0,
            dora_scale=(torch.rand(1, weights.down.shape[1], *conv, generator=generator) + 0.5) if dora else None,
        )
    save_adapter(path, adapters, {}, torch.float32)
    return adapters


def test_two_loras_at_the_sum_of_their_ranks_combine_exactly(tiny_dir, tiny_adapter_file, tmp_path, capsys):
    a_path, b_path, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "ab.safetensors"
    a = tiny_adapter_file(a_path, rank=4, dora=False)
    b = _second_file(b_path, a, dora=False)
    args = ["combine", f"{a_path}:0.7", f"{b_path}:-0.3", "--rank", "7", "--model", str(tiny_dir), "--json"]
    assert main([*args, "--out", str(out)]) == 0
    assert max(layer["merged_error"] for layer in json.loads(capsys.readouterr().out)["per_layer"]) < 1e-5
    combined, targets = load_adapter(out), _targets(tiny_dir)
    assert set(combined.adapters) == set(a) and not any(w.is_dora for w in combined.adapters.values())
    for stem, weights in combined.adapters.items():
        base = targets[stem].module.weight.detach()
        expected = base + 0.7 * a[stem].gamma * a[stem].delta_weight()
        if stem in b:
            expected = expected - 0.3 * b[stem].gamma * b[stem].delta_weight()
        torch.testing.assert_close(merged_weight(base, weights), expected, rtol=1e-4, atol=1e-5)
    record = json.loads(combined.metadata[COMBINE_KEY])
    assert [(s["name"], s["weight"]) for s in record["sources"]] == [("a.safetensors", 0.7), ("b.safetensors", -0.3)]
    assert main(["verify", str(out), "--model", str(tiny_dir)]) == 0


def test_a_dora_and_a_lora_combine_into_a_dora_with_the_targets_norms(tiny_dir, tiny_adapter_file, tmp_path, capsys):
    a_path, b_path, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "ab.safetensors"
    a = tiny_adapter_file(a_path, rank=4, dora=True)
    b = _second_file(b_path, a, dora=False)
    assert main(["combine", str(a_path), str(b_path), "--rank", "2", "--model", str(tiny_dir), "--json",
                 "--out", str(out)]) == 0  # fmt: skip
    report = {layer["stem"]: layer for layer in json.loads(capsys.readouterr().out)["per_layer"]}
    combined, targets = load_adapter(out), _targets(tiny_dir)
    for stem, weights in combined.adapters.items():
        base = targets[stem].module.weight.detach()
        target = merged_weight(base, a[stem]) + (merged_weight(base, b[stem]) - base if stem in b else 0)
        assert weights.dora_axis == "input" and weights.rank == 2
        norms = target.double().transpose(0, 1).flatten(1).norm(dim=1)  # per input channel (convs: over out, kernel)
        torch.testing.assert_close(weights.dora_scale.double().flatten(), norms, rtol=1e-6, atol=0)
        s = torch.linalg.svdvals((target - base).double().flatten(1))  # Eckart-Young at rank 2
        assert report[stem]["change_error"] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    assert main(["verify", str(out), "--model", str(tiny_dir)]) == 0


def test_a_weight_follows_the_last_colon_only_when_it_is_a_number():
    assert (parse_source("a.safetensors:0.5").path.name, parse_source("a.safetensors:0.5").weight) == (
        "a.safetensors",
        0.5,
    )
    assert parse_source(r"C:\loras\a.safetensors").weight == 1.0
    assert str(parse_source(r"C:\loras\a.safetensors").path) == r"C:\loras\a.safetensors"
    assert parse_source(r"C:\loras\a.safetensors:-2").weight == -2.0


@pytest.mark.parametrize("case", ["other-architecture", "rank-0", "rank-above-a-layer", "missing-file", "out-exists"])
def test_combine_refuses_bad_input_and_writes_nothing(case, tiny_dir, tiny_adapter_file, tmp_path, capsys):
    a_path, b_path, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    tiny_adapter_file(a_path, rank=4, dora=False)
    from trainer.kohya.adapter_file import save_adapter

    layer = AdapterWeights(down=torch.randn(4, 8), up=torch.randn(6, 4), alpha=4.0)
    save_adapter(b_path, {"lora_unet_not_in_sdxl": layer}, {}, torch.float32)
    files = [str(a_path), str(a_path)] if case != "other-architecture" else [str(a_path), str(b_path)]
    rank = {"rank-0": "0", "rank-above-a-layer": "500"}.get(case, "4")  # the tiny model's layers are 16-64 wide
    if case == "missing-file":
        files[1] = str(tmp_path / "nope.safetensors")
    if case == "out-exists":
        out.write_bytes(b"keep me")
    assert main(["combine", *files, "--rank", rank, "--model", str(tiny_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and ("choose --rank" in error) == (case == "rank-above-a-layer")
    assert out.read_bytes() == b"keep me" if case == "out-exists" else not out.exists()
