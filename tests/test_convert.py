"""``dora-studio convert``: LoRA -> DoRA merges to the same weight at every strength (magnitudes checked against
norms computed here); DoRA -> LoRA is the best approximation at its rank (against an independent SVD of the
merged change), exact on a round trip; the files verify; and the inputs it refuses without writing."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.adapters import low_rank
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.cli import main
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.convert import CONVERT_KEY, dora_to_lora, lora_to_dora
from trainer.kohya.merge import model_stem_targets, pipeline_parts
from trainer.sdxl.model_files import load_sdxl_pipeline


def _layer(out: int, inner: int, rank: int, seed: int, dora: bool) -> tuple[AdapterWeights, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = AdapterWeights(
        down=torch.randn(rank, inner, generator=generator),
        up=torch.randn(out, rank, generator=generator) * 0.2,
        alpha=rank / 2,
        dora_scale=(torch.rand(1, inner, generator=generator) + 0.5) if dora else None,
    )
    return weights, torch.randn(out, inner, generator=generator)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_lora_to_dora_merges_to_the_loras_weight_at_every_strength(axis):
    lora, base = _layer(12, 9, 4, seed=1, dora=False)
    dora = lora_to_dora(lora, base, axis)
    assert torch.equal(dora.down, lora.down) and torch.equal(dora.up, lora.up)
    merged = (base.double() + lora.gamma * (lora.up.double() @ lora.down.double())).numpy()
    norms = (merged**2).sum(axis=0 if axis == "input" else 1) ** 0.5  # independent: numpy on V itself
    torch.testing.assert_close(dora.dora_scale.double().flatten(), torch.from_numpy(norms), rtol=1e-6, atol=0)
    for strength in (1.0, 0.5, -0.3):
        torch.testing.assert_close(merged_weight(base, dora, strength), merged_weight(base, lora, strength))


def test_dora_to_lora_is_the_best_approximation_at_its_rank_and_a_round_trip_is_exact(monkeypatch):
    dora, base = _layer(30, 24, 6, seed=2, dora=True)
    change = (merged_weight(base, dora) - base).double()
    s = torch.linalg.svdvals(change)  # the magnitudes make the change full rank: rank 6 drops s[6:]
    lora, error = dora_to_lora(dora, base, 6)
    assert lora.rank == 6 and not lora.is_dora and lora.gamma == pytest.approx(dora.gamma)
    assert error == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-6)
    approx = (lora.gamma * lora.up.double() @ lora.down.double() - change).norm() / change.norm()
    assert float(approx) == pytest.approx(error, rel=1e-4)
    monkeypatch.setattr(low_rank, "EXACT_SVD_MAX_SIDE", 4)  # the randomized SVD, as on SDXL's large weights
    assert dora_to_lora(dora, base, 6)[1] <= error * 1.02
    lora_in, base = _layer(20, 16, 5, seed=3, dora=False)  # LoRA -> DoRA -> LoRA: the change is rank 5 again
    back, error = dora_to_lora(lora_to_dora(lora_in, base, "output"), base, 5)
    assert error < 1e-5
    torch.testing.assert_close(merged_weight(base, back), merged_weight(base, lora_in), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_convert_files_on_the_tiny_model_verify_and_say_what_they_are(
    axis, tiny_dir, tiny_adapter_file, tmp_path, capsys
):
    lora_file, dora_file, back = (tmp_path / f"{n}.safetensors" for n in ("lora", "dora", "back"))
    original = tiny_adapter_file(lora_file, rank=4, dora=False)
    args = ["convert", str(lora_file), "--to", "dora", "--axis", axis, "--model", str(tiny_dir), "--json"]
    assert main([*args, "--out", str(dora_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(layer["merged_error"] for layer in report["per_layer"]) < 1e-6  # fp32 file: exact to rounding
    converted = load_adapter(dora_file)
    assert {w.dora_axis for w in converted.adapters.values()} == {axis}
    assert converted.metadata["dora_studio.dora_axis"] == axis
    assert json.loads(converted.metadata["ss_network_args"])["wd_on_output"] == str(axis == "output")
    record = json.loads(converted.metadata[CONVERT_KEY])
    assert record["to"] == "dora" and record["source"] == "lora.safetensors"
    targets = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    for stem, weights in original.items():  # the DoRA file's merge is the LoRA's, on the model's own weights
        base = targets[stem].module.weight.detach()
        torch.testing.assert_close(
            merged_weight(base, converted.adapters[stem]), merged_weight(base, weights), rtol=1e-5, atol=1e-6
        )
    # The output axis is one only PEFT-style loaders merge as trained (docs/adapter-format.md section 4): verify
    # says so for that file, and the converter warns.
    assert main(["verify", str(dora_file), "--model", str(tiny_dir)]) == (0 if axis == "input" else 1)
    assert main(["convert", str(dora_file), "--to", "lora", "--model", str(tiny_dir), "--out", str(back)]) == 0
    restored = load_adapter(back)
    assert "dora_studio.dora_axis" not in restored.metadata and not any(w.is_dora for w in restored.adapters.values())
    assert main(["verify", str(back), "--model", str(tiny_dir)]) == 0


@pytest.mark.parametrize("case", ["already-dora", "rank-with-dora", "out-exists", "other-architecture"])
def test_convert_refuses_bad_input_and_writes_nothing(case, tiny_dir, tiny_adapter_file, tmp_path, capsys):
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tiny_adapter_file(source, rank=4, dora=case == "already-dora")
    args = ["convert", str(source), "--to", "dora", "--model", str(tiny_dir), "--out", str(out)]
    if case == "rank-with-dora":
        args += ["--rank", "2"]
    elif case == "out-exists":
        out.write_bytes(b"keep me")
    elif case == "other-architecture":
        from trainer.kohya.adapter_file import save_adapter

        layer = AdapterWeights(down=torch.randn(4, 8), up=torch.randn(6, 4), alpha=4.0)
        save_adapter(source, {"lora_unet_not_in_sdxl": layer}, {}, torch.float32)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert out.read_bytes() == b"keep me" if case == "out-exists" else not out.exists()


def test_a_dora_moves_to_the_other_axis_exactly_when_its_change_is_a_loras(
    tiny_dir, tiny_adapter_file, tmp_path, capsys
):
    lora_file, dora_in, dora_out, random_in, random_out = (
        tmp_path / f"{n}.safetensors" for n in ("lora", "dora-in", "dora-out", "random-in", "random-out")
    )
    original = tiny_adapter_file(lora_file, rank=4, dora=False)
    model = ["--model", str(tiny_dir), "--json"]
    assert main(["convert", str(lora_file), "--to", "dora", *model, "--out", str(dora_in)]) == 0
    capsys.readouterr()
    assert main(["convert", str(dora_in), "--to", "dora", "--axis", "output", *model, "--out", str(dora_out)]) == 0
    assert max(layer["merged_error"] for layer in json.loads(capsys.readouterr().out)["per_layer"]) < 1e-5
    moved, targets = load_adapter(dora_out), model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    assert {w.dora_axis for w in moved.adapters.values()} == {"output"} and all(
        w.rank == 4 for w in moved.adapters.values()
    )
    for stem, weights in original.items():
        base = targets[stem].module.weight.detach()
        torch.testing.assert_close(
            merged_weight(base, moved.adapters[stem]), merged_weight(base, weights), rtol=1e-4, atol=1e-5
        )
    # A DoRA trained as one (random magnitudes): the rows keep the merged weight's exact lengths; the error is
    # the one computed here from both files.
    trained = tiny_adapter_file(random_in, rank=4, dora=True)
    assert main(["convert", str(random_in), "--to", "dora", "--axis", "output", *model, "--out", str(random_out)]) == 0
    report = {layer["stem"]: layer for layer in json.loads(capsys.readouterr().out)["per_layer"]}
    for stem, weights in load_adapter(random_out).adapters.items():
        base = targets[stem].module.weight.detach()
        before, after = merged_weight(base, trained[stem]), merged_weight(base, weights)
        torch.testing.assert_close(weights.dora_scale.flatten(), before.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        expected = float((after - before).abs().max() / before.abs().max())
        assert report[stem]["merged_error"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
