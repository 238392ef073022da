"""The tiny SDXL pipeline: real layout, deterministic, and an SGM single file diffusers reads back exactly."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

from trainer.builtin.tiny import TINY_CHECKPOINT_NAME, TINY_TEXT_ENCODER_2_CONFIG, build_tiny_pipeline, save_tiny_model
from trainer.sdxl.configs import real_text_encoder_1, real_text_encoder_2, real_unet
from trainer.sdxl.naming import attention_module_paths, conv_module_paths, stem_for, text_encoder_module_paths
from trainer.sdxl.sgm_checkpoint import save_sgm_checkpoint, text_encoder_2_to_sgm, vae_to_sgm

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SGM_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _stems(pipe_or_parts) -> set[str]:
    unet, te1, te2 = pipe_or_parts
    stems = {stem_for("unet", path) for path in attention_module_paths(unet) + conv_module_paths(unet)}
    stems |= {stem_for("te1", path) for path in text_encoder_module_paths(te1)}
    return stems | {stem_for("te2", path) for path in text_encoder_module_paths(te2)}


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for key, tensor in expected_state.items():
        other = actual_state[key]
        assert not other.is_meta, f"{key} was never loaded"
        assert other.dtype == tensor.dtype and torch.equal(other, tensor), key


def test_tiny_model_has_sdxl_targets_and_stems(pipe):
    assert len(attention_module_paths(pipe.unet)) == 722
    assert len(attention_module_paths(pipe.unet) + conv_module_paths(pipe.unet)) == 788
    assert len(text_encoder_module_paths(pipe.text_encoder)) == 72
    assert len(text_encoder_module_paths(pipe.text_encoder_2)) == 192
    real = (real_unet(), real_text_encoder_1(), real_text_encoder_2())
    assert _stems((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)) == _stems(real)


def test_same_seed_same_weights(pipe):
    again = build_tiny_pipeline(seed=0)
    for name in COMPONENTS:
        assert_same_weights(getattr(pipe, name), getattr(again, name))
    other = build_tiny_pipeline(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_tokenizers_read_any_ascii_caption(pipe):
    ids = pipe.tokenizer("A photo of ~1girl!, #42").input_ids
    assert ids[0] == pipe.text_encoder.config.bos_token_id and ids[-1] == pipe.text_encoder.config.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    padded = pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == pipe.tokenizer_2.convert_tokens_to_ids("!")


def test_save_writes_folder_and_single_file(saved):
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "tokenizer_2/tokenizer_config.json"):
        assert (saved / name).is_file(), name
    assert (saved / TINY_CHECKPOINT_NAME).is_file()
    assert not [path.name for path in saved.iterdir() if path.name.endswith(".tmp")]


def test_single_file_layout(saved):
    checkpoint = load_file(saved / TINY_CHECKPOINT_NAME)
    assert all(key.startswith(SGM_PREFIXES) for key in checkpoint)
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    hidden, projection = TINY_TEXT_ENCODER_2_CONFIG["hidden_size"], TINY_TEXT_ENCODER_2_CONFIG["projection_dim"]
    assert checkpoint["conditioner.embedders.1.model.text_projection"].shape == (hidden, projection)
    assert checkpoint["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3 * hidden,
        hidden,
    )
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in checkpoint
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in checkpoint


def test_diffusers_single_file_loader_reads_identical_weights(saved, pipe):
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(saved / TINY_CHECKPOINT_NAME), config=str(saved), local_files_only=True
    )
    for name in COMPONENTS:
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))


def test_diffusers_folder_loads(saved, pipe):
    loaded = StableDiffusionXLPipeline.from_pretrained(saved, local_files_only=True)
    for name in COMPONENTS:
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))


def test_half_precision_checkpoint(tmp_path, pipe):
    path = save_sgm_checkpoint(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    assert {tensor.dtype for tensor in load_file(path).values()} == {torch.float16}


def test_failed_save_leaves_no_temp_file(tmp_path, pipe):
    target = tmp_path / "taken.safetensors"
    target.mkdir()  # os.replace cannot overwrite a folder
    with pytest.raises(OSError):
        save_sgm_checkpoint(pipe, target)
    assert [path.name for path in tmp_path.iterdir()] == ["taken.safetensors"]


def test_unknown_keys_raise():
    with pytest.raises(ValueError, match="encoder.mystery.weight"):
        vae_to_sgm({"decoder.up_blocks.0.upsamplers.0.conv.weight": torch.zeros(1), "encoder.mystery.weight": None})
    with pytest.raises(ValueError, match="logit_scale"):
        text_encoder_2_to_sgm({"logit_scale": torch.zeros(())})


def test_forward_runs_on_cpu(pipe):
    latents = pipe(
        prompt="a tiny cat",
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
