"""End to end on the tiny SDXL-structured model: inject, save, inspect, verify, merge, and bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from trainer.adapters.injection import NetworkSpec, adapter_weights, inject_adapters, remove_adapters
from trainer.builtin.tiny import TINY_CHECKPOINT_NAME
from trainer.cli import main
from trainer.kohya.adapter_file import save_adapter
from trainer.kohya.metadata import build_metadata
from trainer.sdxl.model_files import load_sdxl_pipeline


def unet_inputs(pipe, generator: torch.Generator) -> dict:
    config = pipe.unet.config
    size = config.sample_size
    return {
        "sample": torch.randn(1, config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        },
    }


def _write_trained_adapter(tiny_dir: Path, out: Path, axis: str) -> tuple[torch.Tensor, dict]:
    """Inject DoRA everywhere, move it off the identity, save it; return the adapted UNet's output."""
    pipe = load_sdxl_pipeline(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    network = NetworkSpec(dora=True, rank=4, alpha=2, conv_rank=2, conv_alpha=1, dora_axis=axis)
    adapters = inject_adapters(pipe.unet, "unet", network, unet_targets="attn+conv")
    adapters |= inject_adapters(pipe.text_encoder, "te1", network)
    adapters |= inject_adapters(pipe.text_encoder_2, "te2", network)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=generator) * 0.05)
            layer.dora_scale.mul_(1 + 0.05 * torch.randn(layer.dora_scale.shape, generator=generator))
        inputs = unet_inputs(pipe, torch.Generator().manual_seed(1))
        adapted = pipe.unet(**inputs).sample
    metadata = build_metadata(
        network_kind="dora",
        dim=4,
        alpha=2,
        conv_dim=2,
        conv_alpha=1,
        dora_axis=axis,
        output_name=out.stem,
        base_model_name="tiny-sdxl",
        steps=0,
        epoch=0,
        started_at=0,
        finished_at=0,
        mixed_precision="no",
        learning_rate=1e-4,
        unet_lr=1e-4,
        text_encoder_lr=1e-5,
        tag_frequency={},
        dataset_dirs={},
        resolution=(64, 64),
        title=out.stem,
    )
    save_adapter(out, adapter_weights(adapters), metadata, dtype=torch.float32)
    remove_adapters(pipe.unet)
    return adapted, inputs


@pytest.fixture(scope="module")
def input_axis_file(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "tiny-dora.safetensors"
    adapted, inputs = _write_trained_adapter(tiny_dir, path, "input")
    return path, adapted, inputs


def test_inspect_json(input_axis_file, capsys):
    path, _, _ = input_axis_file
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {part: entry["stems"] for part, entry in summary["parts"].items()} == {"unet": 788, "te1": 72, "te2": 192}
    assert summary["parts"]["unet"]["kinds"] == {"dora-input": 788}
    assert summary["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert summary["unknown_keys"] == []


def test_verify_own_input_axis_file(input_axis_file, tiny_dir, capsys):
    path, _, _ = input_axis_file
    assert main(["verify", str(path), "--model", str(tiny_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stems_checked"] == 788 + 72 + 192
    assert report["unmatched_stems"] == []
    assert {r["front_end"] for r in report["results"]} >= {"ComfyUI", "AUTOMATIC1111", "InvokeAI"}
    assert {r["strength"] for r in report["results"]} == {1.0, 0.5}
    errors = {(r["front_end"], r["strength"]): r["max_rel_error"] for r in report["results"]}
    # A1111 and InvokeAI use ||V|| with no eps, as we do: they must agree to 1e-6.
    assert max(e for (name, _), e in errors.items() if name in ("AUTOMATIC1111", "InvokeAI")) <= 1e-6
    # ComfyUI and Forge add float32 eps to ||V||: a column shift of eps/||V||. The tiny model's TE2 keeps
    # CLIP's init norms (1/sqrt(2*32 layers) = 0.125), so that shift reaches 1.2e-6 there; it is the
    # front ends' own disagreement with each other, not ours.
    assert max(e for (name, _), e in errors.items() if name in ("ComfyUI", "Forge")) <= 1.5e-6


def test_verify_output_axis_file_shows_front_end_disagreement(tiny_dir, tmp_path, capsys):
    path = tmp_path / "tiny-dora-output.safetensors"
    _write_trained_adapter(tiny_dir, path, "output")
    assert main(["verify", str(path), "--model", str(tiny_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "AUTOMATIC1111" in out and "differs" in out


@pytest.mark.parametrize("layout", ["folder", "single-file"])
def test_merge_gives_the_adapted_model(input_axis_file, tiny_dir, tmp_path, layout):
    path, adapted, inputs = input_axis_file
    out = tmp_path / ("merged" if layout == "folder" else "merged.safetensors")
    args = ["merge", "--model", str(tiny_dir), "--adapter", str(path), "--out", str(out)]
    assert main(args) == 0
    merged = load_sdxl_pipeline(out) if layout == "folder" else load_sdxl_pipeline(out, config_dir=tiny_dir)
    with torch.no_grad():
        output = merged.unet(**inputs).sample
    assert ((output - adapted).abs().max() / adapted.abs().max()).item() < 1e-5


def test_merge_from_single_file_model(input_axis_file, tiny_dir, tmp_path):
    path, adapted, inputs = input_axis_file
    single = tiny_dir / TINY_CHECKPOINT_NAME
    out = tmp_path / "merged-from-single"
    args = ["merge", "--model", str(single), "--config-dir", str(tiny_dir), "--adapter", str(path), "--out", str(out)]
    assert main(args) == 0
    with torch.no_grad():
        output = load_sdxl_pipeline(out).unet(**inputs).sample
    assert ((output - adapted).abs().max() / adapted.abs().max()).item() < 1e-5


class _Bomb:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/dora-studio-unpickled-marker"),))


@pytest.mark.parametrize("case", ["pickle_adapter", "pickle_model", "missing_model", "missing_adapter", "other_arch"])
def test_bad_input_gives_a_named_error_not_a_traceback(case, input_axis_file, tiny_dir, tmp_path, capsys):
    adapter, model = str(input_axis_file[0]), str(tiny_dir)
    if case == "pickle_adapter":
        adapter = str(tmp_path / "evil.safetensors")
        Path(adapter).write_bytes(pickle.dumps(_Bomb()))
    elif case == "pickle_model":
        model = str(tmp_path / "model.ckpt")
        Path(model).write_bytes(pickle.dumps(_Bomb()))
    elif case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case == "missing_adapter":
        adapter = str(tmp_path / "nowhere.safetensors")
    else:  # an SD1.5-sized layer under an SDXL stem: shapes do not fit
        from trainer.adapters.weights import AdapterWeights

        weights = {"lora_unet_input_blocks_4_1_proj_in": AdapterWeights(torch.zeros(4, 320), torch.zeros(320, 4), 4.0)}
        adapter = str(tmp_path / "sd15.safetensors")
        save_adapter(Path(adapter), weights, {})
    code = main(["merge", "--model", model, "--adapter", adapter, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    named = {"pickle_model": model, "missing_model": model}.get(case, adapter)
    assert "error: " in err and named in err
    assert "Traceback" not in err
    assert not Path("/tmp/dora-studio-unpickled-marker").exists()
    assert not (tmp_path / "out").exists()


def test_diffusers_underscore_stems_are_renamed_and_verified(input_axis_file, tiny_dir, tmp_path, capsys):
    """Files from trainers that write diffusers-style UNet stems verify like ours after renaming."""
    from trainer.kohya.adapter_file import load_adapter
    from trainer.sdxl.naming import attention_module_paths, conv_module_paths, stem_for

    path = input_axis_file[0]
    loaded = load_adapter(path)
    unet = load_sdxl_pipeline(tiny_dir).unet
    diffusers_stem = {
        stem_for("unet", p): "lora_unet_" + p.replace(".", "_")
        for p in attention_module_paths(unet) + conv_module_paths(unet)
    }
    renamed = {diffusers_stem.get(stem, stem): weights for stem, weights in loaded.adapters.items()}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in renamed
    foreign = tmp_path / "diffusers-stems.safetensors"
    save_adapter(foreign, renamed, loaded.metadata, dtype=torch.float32)
    assert main(["verify", str(foreign), "--model", str(tiny_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stems_checked"] == len(loaded.adapters) and report["unmatched_stems"] == []


def test_check_data_with_a_preset_counts_what_training_will_run(capsys):
    """check-data --preset uses the preset's buckets and batch size, so its count is the run's."""
    from trainer.config.presets import load_config
    from trainer.data.epoch_plan import epoch_batches, plan_examples
    from trainer.data.scan import scan_dataset

    preset = Path(__file__).resolve().parents[1] / "presets" / "quickstart.toml"
    assert main(["check-data", "--preset", str(preset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = load_config(preset)
    examples = plan_examples(scan_dataset(Path(config.dataset.path)), config.dataset.bucket_spec())
    assert report["steps_per_epoch"] == len(epoch_batches(examples, config.training.batch_size, seed=0, epoch=0))
    assert report["batch_size"] == 4 and set(report["buckets"]) == {"64x192", "128x128"}
