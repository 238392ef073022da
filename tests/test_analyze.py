"""``dora-studio analyze``: the DoRA paper's ΔM and ΔD of adapters whose changes are known in advance, computed
again here with numpy from the tiny model's weights; the grouping by layer type and block; ``--run``'s plot
and fit; and the bad inputs it refuses."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.adapters.decomposition import decomposition_change, slope_and_correlation
from trainer.adapters.weights import AdapterWeights
from trainer.cli import main
from trainer.kohya.adapter_file import save_adapter
from trainer.kohya.analyze import attention_kind, block_name, layer_type
from trainer.kohya.merge import model_stem_targets, pipeline_parts
from trainer.sdxl.model_files import load_sdxl_pipeline

Q_DOWN_1 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K_UP_0 = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k"
CONV_DOWN_0 = "lora_unet_input_blocks_1_0_in_layers_2"
FF_MID = "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2"
Q_TE1 = "lora_te1_text_model_encoder_layers_5_self_attn_q_proj"
FC1_TE2 = "lora_te2_text_model_encoder_layers_30_mlp_fc1"


# -- the measures ----------------------------------------------------------------------------------


def test_decomposition_separates_magnitude_from_direction():
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    rows = torch.tensor([1.5, 0.5, 2.0, 1.0, 1.0, 3.0])
    scaled_rows = base * rows[:, None]  # every output row keeps its direction
    magnitude, direction = decomposition_change(base, scaled_rows, "output")
    assert direction == pytest.approx(0.0, abs=1e-12)
    assert magnitude == pytest.approx(float(((rows - 1).abs() * base.norm(dim=1)).mean()))
    assert decomposition_change(base, scaled_rows, "input")[1] > 0.01  # columns do turn
    turned = base.clone()
    turned[:, [0, 1]] = turned[:, [1, 0]]  # same norms per row, new directions
    magnitude, direction = decomposition_change(base, turned, "output")
    assert magnitude == pytest.approx(0.0, abs=1e-6)
    cosine = torch.nn.functional.cosine_similarity(base.double(), turned.double(), dim=1)
    assert direction == pytest.approx(float((1 - cosine).mean()))


def test_a_conv_is_measured_per_input_channel_on_the_input_axis():
    """DoRA's input-axis magnitude of a conv is one number per input channel, (1, in, 1, 1): over out and kh, kw."""
    base = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    channels = torch.tensor([0.5, 1.0, 2.0])
    magnitude, direction = decomposition_change(base, base * channels[None, :, None, None], "input")
    norms = base.transpose(0, 1).flatten(1).norm(dim=1)
    assert direction == pytest.approx(0.0, abs=1e-12)
    assert magnitude == pytest.approx(float(((channels - 1).abs() * norms).mean()))


def test_slope_and_correlation():
    slope, r = slope_and_correlation([0.1, 0.2, 0.3, 0.4], [1.0, 0.8, 0.6, 0.4])
    assert slope == pytest.approx(-2.0) and r == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in slope_and_correlation([0.1], [0.2]))


@pytest.mark.parametrize(
    ("stem", "kind", "attention", "block"),
    [
        (Q_DOWN_1, "q", "self", "unet down_blocks.1"),
        (K_UP_0, "k", "cross", "unet up_blocks.0"),
        ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", "out", "self", "unet mid_block"),
        (FF_MID, "ff", None, "unet mid_block"),
        ("lora_unet_output_blocks_4_1_proj_in", "proj", None, "unet up_blocks.1"),
        (CONV_DOWN_0, "conv", None, "unet down_blocks.0"),
        ("lora_unet_input_blocks_3_0_op", "conv", None, "unet down_blocks.0"),  # the downsampler
        ("lora_unet_output_blocks_2_2_conv", "conv", None, "unet up_blocks.0"),  # the upsampler
        ("lora_unet_output_blocks_8_0_skip_connection", "conv", None, "unet up_blocks.2"),
        ("lora_unet_input_blocks_0_0", "conv", None, "unet outside blocks"),  # conv_in
        ("lora_unet_input_blocks_1_0_emb_layers_1", "other", None, "unet down_blocks.0"),  # time_emb_proj
        ("lora_unet_time_embed_0", "other", None, "unet outside blocks"),
        (Q_TE1, "q", "self", "te1 layers 4-7"),
        ("lora_te1_text_model_encoder_layers_11_self_attn_out_proj", "out", "self", "te1 layers 8-11"),
        (FC1_TE2, "ff", None, "te2 layers 28-31"),
        ("lora_te2_text_projection", "other", None, "te2 outside layers"),
    ],
)
def test_stems_are_named_by_type_attention_and_block(stem, kind, attention, block):
    part = "unet" if stem.startswith("lora_unet_") else stem[5:8]
    assert (layer_type(stem), attention_kind(stem), block_name(stem, part)) == (kind, attention, block)


# -- one file, changes known in advance ------------------------------------------------------------


@pytest.fixture(scope="module")
def base_weights(tiny_dir) -> dict[str, np.ndarray]:
    targets = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    stems = (Q_DOWN_1, CONV_DOWN_0, FF_MID, Q_TE1, FC1_TE2)
    return {stem: targets[stem].module.weight.detach().double().numpy() for stem in stems}


def _vectors(weight: np.ndarray, axis: str) -> np.ndarray:
    """One row per vector: output features, or input channels (over out and kernel positions)."""
    return (
        weight.reshape(weight.shape[0], -1)
        if axis == "output"
        else np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    )


def _expected(base: np.ndarray, tuned: np.ndarray, axis: str) -> tuple[float, float]:
    """The paper's ΔM and ΔD, computed with numpy."""
    b, t = _vectors(base, axis), _vectors(tuned, axis)
    b_norm, t_norm = np.linalg.norm(b, axis=1), np.linalg.norm(t, axis=1)
    return float(np.abs(t_norm - b_norm).mean()), float((1 - (b * t).sum(axis=1) / (b_norm * t_norm)).mean())


def _column_norms(weight: np.ndarray) -> np.ndarray:
    return np.linalg.norm(_vectors(weight, "input"), axis=1)


def _known_changes(base: dict[str, np.ndarray]) -> tuple[dict[str, AdapterWeights], dict[str, np.ndarray]]:
    """Adapters whose merged weight is known exactly, and that weight."""
    rng = np.random.default_rng(0)
    adapters, tuned = {}, {}
    # DoRA, up = 0: the magnitude alone changes, column by column (input axis), by c.
    for stem in (Q_TE1, CONV_DOWN_0):
        w = base[stem]
        c = rng.uniform(0.5, 1.5, w.shape[1])
        scale = (c * _column_norms(w)).reshape(1, w.shape[1], *[1] * (w.ndim - 2))
        down = torch.tensor(rng.normal(size=(2, *w.shape[1:])), dtype=torch.float32)
        up = torch.zeros(w.shape[0], 2, *[1] * (w.ndim - 2))
        adapters[stem] = AdapterWeights(down, up, 2.0, torch.tensor(scale, dtype=torch.float32))
        tuned[stem] = w * c.reshape(1, -1, *[1] * (w.ndim - 2))
    # LoRA: W' = W R with R a rotation by 0.3 rad in the plane of inputs 0 and 1: W (R - I) is rank 2.
    w = base[Q_DOWN_1]
    rotation = np.eye(w.shape[1])
    rotation[:2, :2] = [[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]]
    up, down = w[:, :2], (rotation - np.eye(w.shape[1]))[:2]
    adapters[Q_DOWN_1] = AdapterWeights(
        torch.tensor(down, dtype=torch.float32), torch.tensor(up, dtype=torch.float32), 2.0
    )
    tuned[Q_DOWN_1] = w @ rotation
    # LoRA: three input columns scaled by s, as W[:, cols] diag(s - 1) (alpha 6 = 2 x rank 3).
    w, cols, s = base[FC1_TE2], [0, 3, 7], np.array([1.5, 0.25, 2.0])
    down = np.zeros((3, w.shape[1]))
    down[range(3), cols] = (s - 1) / 2
    adapters[FC1_TE2] = AdapterWeights(
        torch.tensor(down, dtype=torch.float32), torch.tensor(w[:, cols], dtype=torch.float32), 6.0
    )
    tuned[FC1_TE2] = w.copy()
    tuned[FC1_TE2][:, cols] *= s
    return adapters, tuned


def test_known_magnitude_and_direction_changes(base_weights, tiny_dir, tmp_path, capsys):
    adapters, tuned = _known_changes(base_weights)
    path = tmp_path / "known.safetensors"
    save_adapter(path, adapters, {}, dtype=torch.float32)
    assert main(["analyze", str(path), "--model", str(tiny_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["kind"], result["axis"], result["stems"]) == ("LoRA and DoRA", "input", 4)
    layers = {layer["stem"]: layer for layer in result["layers"]}
    for stem, weight in tuned.items():
        for axis in ("input", "output"):
            magnitude, direction = _expected(base_weights[stem], weight, axis)
            found = layers[stem][axis]
            assert found["dM"] == pytest.approx(magnitude, rel=1e-4, abs=1e-6), (stem, axis)
            assert found["dD"] == pytest.approx(direction, rel=1e-3, abs=1e-6), (stem, axis)
    # What was built to change only the magnitude of the columns did so, and the rotation only turned rows.
    for stem in (Q_TE1, CONV_DOWN_0, FC1_TE2):
        assert layers[stem]["input"]["dD"] < 1e-6 < layers[stem]["input"]["dM"]
    assert layers[Q_DOWN_1]["output"]["dM"] < 1e-6 < layers[Q_DOWN_1]["output"]["dD"]
    # Groups are the means of their layers; blocks come most turned first.
    by_type = {group["name"]: group for group in result["by_type"]}
    assert list(by_type) == ["q", "ff", "conv"]
    q_layers = [layers[Q_DOWN_1], layers[Q_TE1]]
    assert by_type["q"]["layers"] == 2
    assert by_type["q"]["output"]["dD"] == pytest.approx(np.mean([layer["output"]["dD"] for layer in q_layers]))
    blocks = [group["name"] for group in result["by_block"]]
    assert sorted(blocks) == sorted(["unet down_blocks.1", "te1 layers 4-7", "unet down_blocks.0", "te2 layers 28-31"])
    assert blocks[0] == "unet down_blocks.1"  # the only layer that turned on the input axis
    turned = [group["input"]["dD"] for group in result["by_block"]]
    assert turned == sorted(turned, reverse=True)


def test_an_output_axis_file_is_measured_on_its_axis_first(base_weights, tiny_dir, tmp_path, capsys):
    w = base_weights[FF_MID]
    c = np.random.default_rng(1).uniform(0.5, 1.5, w.shape[0])
    scale = torch.tensor((c * np.linalg.norm(w, axis=1))[:, None], dtype=torch.float32)
    adapter = AdapterWeights(torch.randn(2, w.shape[1]), torch.zeros(w.shape[0], 2), 2.0, scale)
    path = tmp_path / "output-axis.safetensors"
    save_adapter(path, {FF_MID: adapter}, {}, dtype=torch.float32)
    assert main(["analyze", str(path), "--model", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "DoRA on the output axis" in text
    found = re.search(
        r"most changed in direction: unet mid_block \(ΔD (\S+)\); in magnitude: unet mid_block \(ΔM (\S+)\)", text
    )
    assert float(found[1]) < 1e-6
    assert float(found[2]) == pytest.approx(float((np.abs(c - 1) * np.linalg.norm(w, axis=1)).mean()), rel=1e-3)


# -- a run's checkpoints ---------------------------------------------------------------------------


def _run_folder(run_dir: Path, tiny_dir: Path) -> None:
    """A run folder of the tiny model that has saved nothing yet (adapters named ``tiny``)."""
    (run_dir / "adapters").mkdir(parents=True)
    (run_dir / "config.toml").write_text(
        f'[model]\npath = "{tiny_dir}"\n\n[dataset]\npath = "data"\n\n[saving]\noutput_name = "tiny"\n'
    )


def _save_checkpoints(run_dir: Path, base: dict[str, np.ndarray], names: list[str]) -> None:
    """Adapters that grow along a fixed random direction, saved in the order of ``names``."""
    generator = torch.Generator().manual_seed(2)
    directions = {
        stem: (
            torch.randn(4, *base[stem].shape[1:], generator=generator),
            torch.randn(base[stem].shape[0], 4, *[1] * (base[stem].ndim - 2), generator=generator),
        )
        for stem in (Q_DOWN_1, Q_TE1, CONV_DOWN_0, FF_MID)
    }
    for step, name in enumerate(names, start=1):
        adapters = {stem: AdapterWeights(down, up * 0.02 * step, 4.0) for stem, (down, up) in directions.items()}
        path = run_dir / "adapters" / f"{name}.safetensors"
        save_adapter(path, adapters, {}, dtype=torch.float32)
        os.utime(path, (1_000_000 + step, 1_000_000 + step))  # the order the run saved them in


def test_run_writes_the_plot_and_the_fit_of_every_layer_type(base_weights, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _run_folder(run, tiny_dir)
    _save_checkpoints(run, base_weights, ["tiny-epoch001", "tiny-epoch002", "tiny"])
    assert main(["analyze", "--run", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoints"] == ["tiny-epoch001.safetensors", "tiny-epoch002.safetensors", "tiny.safetensors"]
    assert json.loads((run / "analysis" / "decomposition.json").read_text()) == result
    assert (run / "analysis" / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["by_type"]) == {"q", "ff", "conv"}
    for kind, fits in result["by_type"].items():
        for axis, fit in fits.items():
            points = np.array(fit["points"])
            assert len(points) == 3 * (2 if kind == "q" else 1)
            assert sorted(set(points[:, 0])) == [0, 1, 2]
            assert fit["slope"] == pytest.approx(np.polyfit(points[:, 1], points[:, 2], 1)[0], rel=1e-9), (kind, axis)
            assert fit["r"] == pytest.approx(np.corrcoef(points[:, 1], points[:, 2])[0, 1], rel=1e-9), (kind, axis)
    # The points are the layers' own numbers: the last checkpoint's agree with analyzing that file alone.
    assert main(["analyze", str(run / "adapters" / "tiny.safetensors"), "--model", str(tiny_dir), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    last_q = sorted((d, m) for i, d, m in result["by_type"]["q"]["input"]["points"] if i == 2)
    assert last_q == sorted(
        (layer["input"]["dD"], layer["input"]["dM"]) for layer in alone["layers"] if layer["type"] == "q"
    )
    assert result["last"]["by_block"] == alone["by_block"]


def test_run_text_report_and_out_folder(base_weights, tiny_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "elsewhere"
    _run_folder(run, tiny_dir)
    _save_checkpoints(run, base_weights, ["tiny-epoch001", "tiny"])
    assert main(["analyze", "--run", str(run), "--out", str(out), "--model", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "2 checkpoints (LoRA, input axis): tiny-epoch001.safetensors, tiny.safetensors" in text
    assert f"wrote {out / 'decomposition.png'}" in text
    assert (out / "decomposition.png").is_file() and (out / "decomposition.json").is_file()
    assert not (run / "analysis").exists()


# -- bad input -------------------------------------------------------------------------------------


def test_a_file_for_another_model_names_its_stems(tiny_dir, tmp_path, capsys):
    sd15 = {  # SD1.5-sized layers under SDXL stems, and stems SDXL does not have
        Q_DOWN_1: AdapterWeights(torch.zeros(4, 320), torch.zeros(320, 4), 4.0),
        **{
            f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_{n}": AdapterWeights(
                torch.zeros(4, 320), torch.zeros(320, 4), 4.0
            )
            for n in "qkv"
        },
    }
    path = tmp_path / "sd15.safetensors"
    save_adapter(path, sd15, {})
    assert main(["analyze", str(path), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path} does not fit the model" in err and "Traceback" not in err
    assert f"{Q_DOWN_1}: adapter (320, 4) x (4, 320) does not fit weight (32, 32)" in err
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q: no such module" in err


def test_a_run_with_no_adapter_yet_is_refused(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _run_folder(run, tiny_dir)
    assert main(["analyze", "--run", str(run)]) == 2
    assert f"error: {run / 'adapters'}: holds no adapter yet" in capsys.readouterr().err
    assert not (run / "analysis").exists()


@pytest.mark.parametrize("argv", [[], ["x.safetensors"], ["x.safetensors", "--run", "r"], ["--run", "nowhere"]])
def test_usage_errors(argv, capsys):
    assert main(["analyze", *argv]) == 2
    assert "give an adapter FILE and --model MODEL, or --run RUN_DIR" in capsys.readouterr().err
