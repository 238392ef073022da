"""``dora-studio resize``: kohya's dynamic rank rules against a direct implementation of them on the full SVD of
each update; DoRA's magnitudes kept; the file end to end on the tiny model (merged errors, record, verify); and
the inputs it refuses without writing anything."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from trainer.adapters.low_rank import DYNAMIC_METHODS
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.cli import main
from trainer.kohya.adapter_file import load_adapter, save_adapter
from trainer.kohya.merge import model_stem_targets, pipeline_parts
from trainer.kohya.resize import RESIZE_KEY, resize_adapters
from trainer.sdxl.model_files import load_sdxl_pipeline


def _layer(out: int, inner: int, rank: int, decay: float, dora: bool, seed: int) -> AdapterWeights:
    """A layer whose update has singular values decaying by ``decay`` per index (so the rules differ by layer)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(inner, rank, generator=generator, dtype=torch.float64))[0].T
    values = decay ** torch.arange(rank, dtype=torch.float64)
    return AdapterWeights(
        down=right.float(),
        up=(left * values).float(),
        alpha=rank / 2,
        dora_scale=(torch.rand(1, inner, generator=generator) + 0.5) if dora else None,
    )


def _kohya_rank(update: torch.Tensor, method: str, param: float, cap: int) -> int:
    """kohya's resize_lora.py, written out: its index rules on the full SVD of the merged update, plus one; a
    zero update gets rank 1; the new rank is capped at --new_rank."""
    s = torch.linalg.svdvals(update.double())
    if method == "sv_ratio":
        index = int(torch.sum(s > s[0] / param).item()) - 1
    elif method == "sv_fro":
        squares = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(squares, dim=0) / float(torch.sum(squares)), param**2))
    else:
        index = int(torch.searchsorted(torch.cumsum(s, dim=0) / float(torch.sum(s)), param))
    new_rank = max(0, min(index, len(s) - 1)) + 1
    return 1 if s[0] <= 1e-6 else min(new_rank, cap)


@pytest.mark.parametrize("method,params", [("sv_ratio", (2.0, 10.0, 100.0)), ("sv_fro", (0.5, 0.9, 0.99)),
                                           ("sv_cumulative", (0.5, 0.9, 0.99))])  # fmt: skip
def test_dynamic_ranks_are_kohyas_on_the_same_layers(method, params):
    layers = {f"layer{i}": _layer(40, 30, 12, decay, dora=False, seed=i) for i, decay in enumerate((0.3, 0.7, 0.95))}
    layers["zero"] = AdapterWeights(down=torch.randn(12, 30), up=torch.zeros(40, 12), alpha=6.0)
    assert method in DYNAMIC_METHODS
    for param in params:
        resized = resize_adapters(layers, rank=10, method=method, param=param)
        ours = {layer.stem: layer.new_rank for layer in resized.layers}
        theirs = {stem: _kohya_rank(w.up @ w.down, method, param, cap=10) for stem, w in layers.items()}
        assert ours == theirs, (method, param)


def test_a_dora_layer_keeps_its_magnitudes_and_the_error_is_the_dropped_singular_values():
    full = _layer(24, 20, 8, 0.6, dora=True, seed=5)
    (layer,) = resize_adapters({"a": full}, rank=3).layers
    cut = resize_adapters({"a": full}, rank=3).adapters["a"]
    assert torch.equal(cut.dora_scale, full.dora_scale) and cut.gamma == pytest.approx(full.gamma)
    base = torch.randn(24, 20, generator=torch.Generator().manual_seed(2))
    column_norms = merged_weight(base, cut).norm(dim=0)  # the merged weight's columns are still m long
    torch.testing.assert_close(column_norms, full.dora_scale.flatten(), rtol=1e-5, atol=1e-6)
    s = torch.linalg.svdvals((full.up @ full.down).double())
    assert layer.update_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-5)
    same = resize_adapters({"a": full}, rank=8)  # the same rank: the layer as it was
    assert same.adapters["a"] is full and same.layers[0].update_error == 0.0


def test_resize_on_the_tiny_model_reports_merged_errors_records_the_source_and_verifies(
    tiny_dir, tiny_adapter_file, tmp_path, capsys
):
    source, out = tmp_path / "dora.safetensors", tmp_path / "dora-r3.safetensors"
    tiny_adapter_file(source)
    assert main(["resize", str(source), "--rank", "3", "--model", str(tiny_dir), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    resized, original = load_adapter(out), load_adapter(source)
    assert {w.rank for w in resized.adapters.values()} == {3}
    record = json.loads(resized.metadata[RESIZE_KEY])
    assert record["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["layers_cut"] == 7 and resized.metadata["ss_network_dim"] == "3"
    # Each layer's merged error, computed again here from the model's weights and both files.
    targets = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    for layer in report["per_layer"]:
        base = targets[layer["stem"]].module.weight.detach()
        before = merged_weight(base, original.adapters[layer["stem"]])
        after = merged_weight(base, resized.adapters[layer["stem"]])
        expected = float((after - before).abs().max() / before.abs().max())
        assert layer["merged_error"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert record["merged_error_max"] == pytest.approx(max(layer["merged_error"] for layer in report["per_layer"]))
    assert main(["verify", str(out), "--model", str(tiny_dir)]) == 0
    assert main(["inspect", str(out)]) == 0


def test_max_error_picks_each_layers_smallest_rank_within_it(tiny_dir, tiny_adapter_file, tmp_path, capsys):
    source, out = tmp_path / "dora.safetensors", tmp_path / "dora-within.safetensors"
    original = tiny_adapter_file(source)
    args = ["resize", str(source), "--rank", "8", "--max-error", "0.05", "--model", str(tiny_dir), "--json"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    ranks = {layer["stem"]: layer["new_rank"] for layer in report["per_layer"]}
    assert len(set(ranks.values())) > 1 and all(layer["merged_error"] <= 0.05 for layer in report["per_layer"])
    targets = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    for stem, rank in ranks.items():  # one rank fewer would not do (the search is not trusted: checked here)
        if rank > 1:
            base = targets[stem].module.weight.detach()
            s_update = resize_adapters({stem: original[stem]}, rank=rank - 1).adapters[stem]
            full = merged_weight(base, original[stem])
            assert float((merged_weight(base, s_update) - full).abs().max() / full.abs().max()) > 0.05
    record = json.loads(load_adapter(out).metadata[RESIZE_KEY])
    assert record["max_error"] == 0.05 and load_adapter(out).metadata["ss_network_dim"] == "Dynamic"
    assert (
        main(["resize", str(source), "--rank", "8", "--max-error", "0.05", "--out", str(tmp_path / "x.safetensors")])
        == 2
    )
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["out-exists", "rank-0", "pickle", "nothing-to-cut", "other-architecture"])
def test_resize_refuses_bad_input_and_writes_nothing(case, tiny_dir, tmp_path, capsys):
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    adapters = {"lora_unet_foo": AdapterWeights(down=torch.randn(4, 8), up=torch.randn(6, 4), alpha=4.0)}
    save_adapter(source, adapters, {}, torch.float32)
    args = ["resize", str(source), "--rank", "2", "--out", str(out)]
    if case == "out-exists":
        out.write_bytes(b"keep me")
    elif case == "rank-0":
        args[3] = "0"
    elif case == "pickle":
        source = tmp_path / "in.ckpt"
        source.write_bytes(b"\x80\x04not really")
        args[1] = str(source)
    elif case == "nothing-to-cut":
        args[3] = "4"
    else:  # stems the model does not have: an adapter for another architecture
        args += ["--model", str(tiny_dir)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and (str(out) in error or str(source) in error or "rank" in error)
    assert out.read_bytes() == b"keep me" if case == "out-exists" else not out.exists()
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("*.tmp"))


def test_a_peft_named_file_is_resized_to_kohya_stems_that_verify(tiny_dir, tmp_path, capsys):
    """Inputs are read as ``inspect`` reads them: PEFT's names (diffusers module paths) come out as the SGM stems
    front ends read."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4)
    source, out = tmp_path / "peft.safetensors", tmp_path / "kohya-r2.safetensors"
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 32 x 32 in the tiny model
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 32, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(32, 4, generator=generator) * 0.1}, source)  # fmt: skip
    assert main(["resize", str(source), "--rank", "2", "--model", str(tiny_dir), "--out", str(out)]) == 0
    assert "1 of 1 layers cut" in capsys.readouterr().out
    assert list(load_adapter(out).adapters) == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert main(["verify", str(out), "--model", str(tiny_dir)]) == 0
