"""network.init_from: a run starts from a file's weights (kohya, PEFT-named, ours), exactly, or refuses clearly."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_training import settings, small_dataset, train  # noqa: F401 (a fixture)

from trainer.adapters.dora_norm import dora_scale_shape
from trainer.adapters.injection import adapter_weights
from trainer.adapters.quantized import frozen_weight, quantize_frozen
from trainer.adapters.weights import AdapterWeights
from trainer.builtin.tiny import build_tiny_pipeline
from trainer.config.schema import NetworkSettings, TrainConfig
from trainer.errors import ConfigError
from trainer.kohya.adapter_file import save_adapter
from trainer.kohya.metadata import VERA_KEY
from trainer.training.init_from import init_from_file
from trainer.training.network import inject_network
from trainer.training.saving import vera_record

CPU = torch.device("cpu")
# Two self-attention Linears, a cross-attention one (its input is the text width) and a 3x3 resnet conv.
FILE_STEMS = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_1_0_in_layers_2",
)
FRESH_STEM = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"  # not in the files
TE_STEM = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def run(precision: str | None = None, **network):
    """A tiny pipeline with a fresh network of these settings (unless said: attn+conv, rank 4, and only the files'
    layers, FRESH_STEM and TE_STEM, so that it is quick to build)."""
    pipe = build_tiny_pipeline()
    if precision:  # the files' attention block: quantizing the whole UNet takes seconds
        quantize_frozen(pipe.unet.down_blocks[1].attentions[0], precision, CPU, torch.float32)
    config = TrainConfig()
    defaults = {"unet_targets": "attn+conv", "rank": 4, "conv_rank": 4, "include": [*FILE_STEMS, FRESH_STEM, TE_STEM]}
    config.network = NetworkSettings(**defaults | network)
    return pipe, inject_network(pipe, config), config.network


def layers_of(adapters) -> dict:
    return {stem: layer for part in adapters.values() for stem, layer in part.items()}


def random_weights(adapters, stems=FILE_STEMS, rank=4, alpha=2.0, dora_axis=None) -> dict[str, AdapterWeights]:
    """Random factors (and magnitudes on ``dora_axis``) in the shapes of the run's layers named by ``stems``."""
    generator = torch.Generator().manual_seed(5)
    weights = {}
    for stem in stems:
        layer = layers_of(adapters)[stem]
        down = torch.randn(rank, *layer.down_shape[1:], generator=generator) * 0.2
        up = torch.randn(layer.up_shape[0], rank, *layer.up_shape[2:], generator=generator) * 0.2
        shape = dora_scale_shape((layer.up_shape[0], *layer.down_shape[1:]), dora_axis) if dora_axis else None
        scale = torch.rand(shape, generator=generator) + 0.5 if shape else None
        weights[stem] = AdapterWeights(down, up, alpha, scale)
    return weights


def lora_file(tmp_path, adapters, **kwargs) -> tuple:
    path = tmp_path / "start.safetensors"
    weights = random_weights(adapters, **kwargs)
    save_adapter(path, weights, {}, torch.float32)
    return path, weights


def test_a_lora_file_starts_a_dora_run_at_its_own_merged_weight(tmp_path, caplog):
    """LoRA -> DoRA at another alpha: each layer's merged weight (and output) is W + (alpha_file / r) up @ down,
    computed here from the file's tensors; the layers the file lacks stay the identity, named in one warning."""
    pipe, adapters, net = run(kind="dora", alpha=8.0)
    path, weights = lora_file(tmp_path, adapters, alpha=2.0)
    with caplog.at_level(logging.WARNING, logger="dora_studio"):
        init_from_file(path, pipe, adapters, net)
    layers = layers_of(adapters)
    for stem, file_layer in weights.items():
        layer = layers[stem]
        base = layer.base.weight.detach()
        delta = (file_layer.up.flatten(1) @ file_layer.down.flatten(1)).reshape(base.shape)
        expected = base + (2.0 / 4) * delta
        torch.testing.assert_close(layer.merged_weight(), expected, rtol=1e-5, atol=1e-6)
        reference = copy.deepcopy(layer.base)
        reference.weight.data = expected
        x = torch.randn(2, base.shape[1], *([6, 6] if base.dim() == 4 else []))
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)
    fresh = next(stem for stem in layers if stem not in weights)
    assert torch.equal(layers[fresh].merged_weight(), layers[fresh].base.weight)
    assert [r.message.split(":")[0] for r in caplog.records] == ["network.init_from"]
    assert f"{len(layers) - len(weights)} adapted layers are not in the file" in caplog.records[0].message


def test_a_dora_file_starts_a_dora_run_with_its_factors_and_magnitudes(tmp_path):
    pipe, adapters, net = run(kind="dora", alpha=2.0, conv_alpha=2.0)
    path, weights = lora_file(tmp_path, adapters, dora_axis="input")
    init_from_file(path, pipe, adapters, net)
    for stem, stored in adapter_weights(layers_of(adapters)).items():
        if stem in weights:
            for name in ("down", "up", "dora_scale"):
                assert torch.equal(getattr(stored, name), getattr(weights[stem], name)), (stem, name)


def _peft_keys(pipe, adapters, weights: dict[str, AdapterWeights], underscore: bool) -> dict[str, torch.Tensor]:
    """The file as PEFT writes it (``unet.<diffusers path>.lora_A.weight``, no alpha) or as some trainers do
    (``lora_unet_<diffusers path with underscores>.lora_down.weight``)."""
    paths = {id(module): path for path, module in pipe.unet.named_modules()}
    layers = layers_of(adapters)
    tensors = {}
    for stem, w in weights.items():
        path = paths[id(layers[stem])]
        if underscore:
            prefix = "lora_unet_" + path.replace(".", "_")
            tensors |= {f"{prefix}.lora_down.weight": w.down, f"{prefix}.lora_up.weight": w.up}
        else:
            tensors |= {f"unet.{path}.lora_A.weight": w.down, f"unet.{path}.lora_B.weight": w.up}
    return tensors


@pytest.mark.parametrize("naming", ["kohya", "peft", "diffusers_underscore"])
def test_kohya_and_peft_named_files_start_the_same_layers(tmp_path, naming):
    pipe, adapters, net = run(kind="lora", alpha=4.0)  # alpha = rank: what a file without alpha means
    weights = random_weights(adapters, alpha=4.0)
    path = tmp_path / f"{naming}.safetensors"
    if naming == "kohya":
        save_adapter(path, weights, {}, torch.float32)
    else:
        save_file(_peft_keys(pipe, adapters, weights, underscore=naming != "peft"), path)
    init_from_file(path, pipe, adapters, net)
    layers = layers_of(adapters)
    for stem, w in weights.items():
        assert torch.equal(layers[stem].lora_down.detach(), w.down) and torch.equal(layers[stem].lora_up.detach(), w.up)


def refusal(tmp_path, weights, **network) -> ConfigError:
    """The error starting a run of ``network`` from a file of ``weights``; it names the file."""
    pipe, adapters, net = run(**network)
    path = tmp_path / "start.safetensors"
    save_adapter(path, weights, {}, torch.float32)
    with pytest.raises(ConfigError) as info:
        init_from_file(path, pipe, adapters, net)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize(("file_rank", "fix"), [(8, "dora-studio resize"), (2, "cannot be raised")])
def test_a_rank_other_than_the_runs_names_both_ranks_and_the_fix(tmp_path, file_rank, fix):
    error = refusal(tmp_path, random_weights(run()[1], stems=FILE_STEMS[:1], rank=file_rank), kind="lora")
    assert error.problems[0].where == "network.rank"
    assert f"rank {file_rank} at {FILE_STEMS[0]} but network.rank is 4" in str(error) and fix in str(error)


def test_a_layer_the_run_does_not_adapt_names_the_settings_that_would(tmp_path):
    weights = random_weights(run()[1])
    error = refusal(tmp_path, weights, kind="lora", unet_targets="attn")
    assert error.problems[0].where == "network.init_from"
    assert FILE_STEMS[3] in str(error) and 'network.unet_targets = "attn+conv"' in str(error)
    error = refusal(tmp_path, random_weights(run(train_text_encoders=True)[1], stems=[TE_STEM]), kind="lora")
    assert TE_STEM in str(error) and "network.train_text_encoders = true" in str(error)


def test_a_file_for_another_architecture_is_refused_naming_it(tmp_path):
    sd15 = AdapterWeights(torch.zeros(4, 768), torch.zeros(768, 4), 4.0)
    error = refusal(tmp_path, {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": sd15}, kind="lora")
    assert "another architecture" in str(error) and error.problems[0].where == "network.init_from"
    wide = {FILE_STEMS[0]: AdapterWeights(torch.zeros(4, 640), torch.zeros(640, 4), 4.0)}
    assert FILE_STEMS[0] in str(refusal(tmp_path, wide, kind="lora"))


def test_a_dora_file_for_a_lora_run_or_another_axis_is_refused_with_the_convert_command(tmp_path):
    weights = random_weights(run(kind="dora")[1], dora_axis="input")
    error = refusal(tmp_path, weights, kind="lora")
    assert error.problems[0].where == "network.kind" and "--to lora" in str(error)
    error = refusal(tmp_path, weights, kind="dora", dora_axis="output")
    assert error.problems[0].where == "network.dora_axis" and "--axis output" in str(error)


def test_a_quantized_base_gets_the_magnitude_of_its_dequantized_weight(tmp_path):
    pipe, adapters, net = run("fp8", kind="dora", alpha=2.0)
    path, weights = lora_file(tmp_path, adapters)
    init_from_file(path, pipe, adapters, net)
    layer = layers_of(adapters)[FILE_STEMS[0]]
    file_layer = weights[FILE_STEMS[0]]
    expected = frozen_weight(layer.base) + (2.0 / 4) * file_layer.up @ file_layer.down
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=1e-5, atol=1e-6)


def vera_file(tmp_path, seed: int = 0):
    """A VeRA file over the file stems, with vectors away from their init, as a run saves it."""
    pipe, adapters, net = run(kind="vera", vera_seed=seed)
    generator = torch.Generator().manual_seed(1)
    for layer in layers_of(adapters).values():
        layer.vera_b.data = torch.randn(layer.vera_b.shape, generator=generator)
        layer.vera_d.data = torch.randn(layer.vera_d.shape, generator=generator)
    path = tmp_path / "vera.safetensors"
    metadata = {VERA_KEY: json.dumps(vera_record(adapters, net))}
    save_adapter(path, adapter_weights(layers_of(adapters)), metadata, torch.float32)
    return path, layers_of(adapters)


def test_a_vera_run_starts_from_a_vera_file_of_its_seed_and_refuses_others(tmp_path):
    path, source = vera_file(tmp_path)
    pipe, adapters, net = run(kind="vera")
    init_from_file(path, pipe, adapters, net)
    for stem, layer in layers_of(adapters).items():
        torch.testing.assert_close(layer.vera_b, source[stem].vera_b)
        torch.testing.assert_close(layer.vera_d, source[stem].vera_d)
    pipe, adapters, net = run(kind="vera", vera_seed=3)
    with pytest.raises(ConfigError, match="network.vera_seed = 0"):
        init_from_file(path, pipe, adapters, net)
    error = refusal(tmp_path, random_weights(run()[1]), kind="vera")
    assert "not a VeRA/DVoRA file" in str(error)


def test_a_run_with_init_from_trains_from_the_files_weights(tiny_dir, small_dataset, tmp_path):  # noqa: F811
    """At learning rate 0 the run's saved adapter is the file's: the same update at the run's alpha (4, the file's 2),
    and the layer the file lacks still at zero."""
    pipe, adapters, _ = run(kind="lora")
    path, weights = lora_file(tmp_path, adapters, alpha=2.0)
    data = settings(
        tiny_dir,
        small_dataset,
        tmp_path / "cache",
        network={
            "kind": "lora",
            "rank": 4,
            "alpha": 4.0,
            "unet_targets": "attn+conv",
            "conv_rank": 4,
            "conv_alpha": 4.0,
            "init_from": str(path),
            "include": [*FILE_STEMS, FRESH_STEM],  # few layers: a fast step
        },
        optimizer={"learning_rate": 0.0, "scheduler": "constant", "warmup_steps": 0},
        training={"epochs": 1, "max_steps": 1, "batch_size": 2, "mixed_precision": "no", "seed": 7},
        dataset={"cache_text_encoder_outputs": False},  # one step encodes its batch, not every caption
        sampling={"prompts": []},
        saving={"save_dtype": "fp32"},
    )
    adapter = train(data, tmp_path / "run")
    saved = load_file(adapter)
    with safe_open(adapter, "pt") as opened:  # the file says where it started, by name and content
        record = json.loads(opened.metadata()["dora_studio.init_from"])
    assert record == {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for stem, w in weights.items():
        update = (4.0 / 4) * saved[f"{stem}.lora_up.weight"].flatten(1) @ saved[f"{stem}.lora_down.weight"].flatten(1)
        torch.testing.assert_close(update, (2.0 / 4) * w.up.flatten(1) @ w.down.flatten(1), rtol=1e-5, atol=1e-7)
    assert not saved[f"{FRESH_STEM}.lora_up.weight"].any()
