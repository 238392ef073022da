"""Stems and targets on the real SDXL architecture (meta device, no weights), docs/adapter-format.md sections 2-3."""

import pytest
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from trainer.sdxl.configs import real_text_encoder_1, real_text_encoder_2, real_unet
from trainer.sdxl.naming import (
    attention_module_paths,
    conv_module_paths,
    normalise_text_encoder_path,
    parse_stem_part,
    sgm_path_for,
    stem_for,
    stem_table,
    text_encoder_module_paths,
    unet_diffusers_stem_aliases,
    unet_diffusers_to_sgm,
    unet_sgm_to_diffusers,
)


@pytest.fixture(scope="module")
def unet():
    return real_unet()


@pytest.fixture(scope="module")
def text_encoders():
    return real_text_encoder_1(), real_text_encoder_2()


def test_attention_preset_has_722_stems(unet):
    paths = attention_module_paths(unet)
    assert len(paths) == 722
    assert len({stem_for("unet", path) for path in paths}) == 722


def test_conv_preset_has_788_stems(unet):
    paths = attention_module_paths(unet) + conv_module_paths(unet)
    assert len(conv_module_paths(unet)) == 66
    assert len({stem_for("unet", path) for path in paths}) == 788
    assert not any(path in ("conv_in", "conv_out") for path in paths)


def test_text_encoder_targets(text_encoders):
    te1, te2 = text_encoders
    assert len({stem_for("te1", path) for path in text_encoder_module_paths(te1)}) == 72
    assert len({stem_for("te2", path) for path in text_encoder_module_paths(te2)}) == 192


def test_exact_stems(unet, text_encoders):
    te1, te2 = text_encoders
    unet_stems = {stem_for("unet", path) for path in attention_module_paths(unet) + conv_module_paths(unet)}
    for stem in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_0_1_proj_in",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_output_blocks_0_0_skip_connection",
    ):
        assert stem in unet_stems
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in {
        stem_for("te1", path) for path in text_encoder_module_paths(te1)
    }
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in {
        stem_for("te2", path) for path in text_encoder_module_paths(te2)
    }


def test_every_parameter_maps_through_diffusers_own_converter(unet):
    """Our SGM names, fed to diffusers' SGM->diffusers converter, land on the very same tensors."""
    state = unet.state_dict()
    fake_checkpoint = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        fake_checkpoint[f"model.diffusion_model.{unet_diffusers_to_sgm(module)}.{param}"] = tensor
    assert len(fake_checkpoint) == len(state)
    converted = convert_ldm_unet_checkpoint(fake_checkpoint, dict(unet.config))
    assert converted.keys() == state.keys()
    assert all(converted[key] is state[key] for key in state)
    for path in attention_module_paths(unet) + conv_module_paths(unet):
        sgm_key = f"model.diffusion_model.{sgm_path_for('unet', path)}.weight"
        assert converted[f"{path}.weight"] is fake_checkpoint[sgm_key]


def test_round_trip_of_every_mappable_module(unet):
    mapped = 0
    for path, module in unet.named_modules():
        try:
            sgm = unet_diffusers_to_sgm(path)
        except ValueError:
            # only containers and parameter-free helpers (time_proj, nonlinearity) have no SGM name
            assert not list(module.parameters(recurse=False)), path
            continue
        assert unet_sgm_to_diffusers(sgm) == path
        mapped += 1
    assert mapped > 1800


@pytest.mark.parametrize(
    ("diffusers", "sgm"),
    [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("down_blocks.2.resnets.1.time_emb_proj", "input_blocks.8.0.emb_layers.1"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("mid_block.resnets.1.norm2", "middle_block.2.out_layers.0"),
        ("up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2", "output_blocks.5.1.transformer_blocks.1.ff.net.2"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.1.conv"),  # a level without attention
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("conv_out", "out.2"),
    ],
)
def test_table_rows(diffusers, sgm):
    assert unet_diffusers_to_sgm(diffusers) == sgm
    assert unet_sgm_to_diffusers(sgm) == diffusers


@pytest.mark.parametrize(
    "path", ["down_blocks.0.attentions.0", "down_blocks.2.downsamplers.0.conv", "up_blocks.0.resnets.3", "time_proj"]
)
def test_unmappable_diffusers_path_is_named(path):
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        unet_diffusers_to_sgm(path)


@pytest.mark.parametrize(
    "path", ["input_blocks.9.0", "output_blocks.6.1.conv", "middle_block.3", "input_blocks.1.0.in_layers.1"]
)
def test_unmappable_sgm_path_is_named(path):
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        unet_sgm_to_diffusers(path)


def test_text_encoder_paths_are_normalised_once(text_encoders):
    te1, te2 = text_encoders
    # transformers >= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection keeps text_model
    assert text_encoder_module_paths(te1)[0].startswith("encoder.layers.0.")
    assert text_encoder_module_paths(te2)[0].startswith("text_model.encoder.layers.0.")
    flat, nested = "encoder.layers.3.mlp.fc1", "text_model.encoder.layers.3.mlp.fc1"
    assert normalise_text_encoder_path(flat) == normalise_text_encoder_path(nested) == nested
    assert stem_for("te1", flat) == stem_for("te1", nested) == "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    assert normalise_text_encoder_path("text_projection") == "text_projection"
    stems = [stem_for("te1", path) for path in text_encoder_module_paths(te1)]
    stems += [stem_for("te2", path) for path in text_encoder_module_paths(te2)]
    assert not any("text_model_text_model" in stem for stem in stems)


def test_stem_table_inverts_stems(unet, text_encoders):
    te1, _ = text_encoders
    paths = attention_module_paths(unet) + conv_module_paths(unet)
    table = stem_table(unet, "unet", paths)
    assert len(table) == 788 and sorted(table.values()) == sorted(paths)
    assert table["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    te_table = stem_table(te1, "te1", text_encoder_module_paths(te1))
    stem = "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"
    assert te_table[stem] == "encoder.layers.11.self_attn.out_proj"
    with pytest.raises(ValueError, match="down_blocks.9"):
        stem_table(unet, "unet", ["down_blocks.9.resnets.0.conv1"])


def test_parse_stem_part():
    assert parse_stem_part("lora_unet_out_2") == "unet"
    assert parse_stem_part("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "te1"
    assert parse_stem_part("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "te2"
    with pytest.raises(ValueError, match="lora_unet_, lora_te1_, lora_te2_"):
        parse_stem_part("lora_te_text_model_encoder_layers_0_mlp_fc1")


def test_diffusers_underscore_aliases(unet):
    aliases = unet_diffusers_stem_aliases(attention_module_paths(unet) + conv_module_paths(unet))
    assert len(aliases) == 788
    # every named module may be passed: those with no SGM name are skipped
    all_aliases = unet_diffusers_stem_aliases(path for path, _ in unet.named_modules())
    assert aliases.items() <= all_aliases.items() and "lora_unet_" not in all_aliases
    assert (
        aliases["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
        == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert aliases["lora_unet_up_blocks_0_upsamplers_0_conv"] == "lora_unet_output_blocks_2_2_conv"
