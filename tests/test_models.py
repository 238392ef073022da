"""Model loading: what is refused (pickles, other model families) and why, and that the folder and the
single file of the tiny model load to the same weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

import trainer.builtin.tiny
from trainer.builtin.resolve import resolve_builtin, resolve_model_path
from trainer.builtin.tiny import TINY_CHECKPOINT_NAME
from trainer.errors import ModelLoadError
from trainer.files import default_cache_dir
from trainer.sdxl.model_files import checkpoint_architecture, load_sdxl_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

SD15_KEYS = [
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "first_stage_model.encoder.conv_in.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.out.2.weight",
]
SD2_KEYS = [
    "cond_stage_model.model.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "first_stage_model.decoder.conv_out.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
]
SDXL_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.text_projection",
]
SDXL_REFINER_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.0.model.text_projection",
    "first_stage_model.encoder.conv_in.weight",
]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
FLUX_COMFY_KEYS = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.decoder.conv_in.weight"]
SD3_KEYS = [
    "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
    "model.diffusion_model.x_embedder.proj.weight",
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
    "first_stage_model.decoder.conv_in.weight",
]


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (SD15_KEYS, "Stable Diffusion 1.x"),
        (SD2_KEYS, "Stable Diffusion 2.x"),
        (SDXL_KEYS, "SDXL"),
        (list(reversed(SDXL_KEYS)), "SDXL"),
        (SDXL_REFINER_KEYS, "the SDXL refiner (it has no CLIP-L text encoder; train on SDXL base)"),
        (FLUX_KEYS, "Flux"),
        (FLUX_COMFY_KEYS, "Flux"),
        (SD3_KEYS, "Stable Diffusion 3"),
        (["lm_head.weight", "transformer.h.0.attn.c_attn.weight"], "not a Stable Diffusion checkpoint we recognise"),
        ([], "not a Stable Diffusion checkpoint we recognise"),
    ],
    ids=["sd15", "sd2", "sdxl", "sdxl-reordered", "refiner", "flux", "flux-comfy", "sd3", "random", "empty"],
)
def test_checkpoint_architecture(keys, family):
    assert checkpoint_architecture(keys) == family
    assert checkpoint_architecture(iter(keys)) == family  # a one-pass iterable, as safe_open's keys may be


def test_tiny_single_file_is_recognised_as_sdxl(tiny_dir):
    with safe_open(str(tiny_dir / TINY_CHECKPOINT_NAME), framework="pt") as f:
        assert checkpoint_architecture(f.keys()) == "SDXL"


def write_checkpoint(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


# --- refused single files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (SD15_KEYS, "Stable Diffusion 1.x"),
        (SD2_KEYS, "Stable Diffusion 2.x"),
        (SDXL_REFINER_KEYS, "SDXL refiner"),
        (FLUX_KEYS, "Flux"),
        (SD3_KEYS, "Stable Diffusion 3"),
    ],
    ids=["sd15", "sd2", "refiner", "flux", "sd3"],
)
def test_other_families_are_refused_by_name(tmp_path, keys, family):
    path = write_checkpoint(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelLoadError) as caught:
        load_sdxl_pipeline(path, config_dir=tmp_path)
    message = str(caught.value)
    assert str(path) in message
    assert f"this checkpoint is {family}" in message or f"this checkpoint is the {family}" in message
    assert "not SDXL" in message


class WritesMarkerWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: proof that a file was, or was not, unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_marker_pickle_works(tmp_path):
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(WritesMarkerWhenUnpickled(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.ckpt", "model.CKPT", "model.pt", "model.pth", "model.bin", "model.pkl"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(WritesMarkerWhenUnpickled(marker)))
    with pytest.raises(ModelLoadError, match="pickle checkpoints are refused") as caught:
        load_sdxl_pipeline(path, config_dir=tmp_path)
    assert str(path) in str(caught.value) and ".safetensors" in str(caught.value)
    assert not marker.exists()


def test_missing_pickle_is_refused_for_being_a_pickle(tmp_path):
    with pytest.raises(ModelLoadError, match="pickle"):
        load_sdxl_pipeline(tmp_path / "gone.ckpt")


def test_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(pickle.dumps(WritesMarkerWhenUnpickled(marker)))
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        load_sdxl_pipeline(path, config_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\xff" * 8 + b"{}"], ids=["empty", "text", "header"])
def test_damaged_safetensors_file(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file") as caught:
        load_sdxl_pipeline(path, config_dir=tmp_path)
    assert str(path) in str(caught.value)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_sdxl_pipeline(tmp_path / "nowhere.safetensors")
    assert "nowhere.safetensors" in str(caught.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sdxl_pipeline(tmp_path / "no-folder")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="unknown model file type"):
        load_sdxl_pipeline(path)


def test_sdxl_single_file_without_configs(tmp_path):
    path = write_checkpoint(tmp_path / "mine.safetensors", SDXL_KEYS)
    with pytest.raises(ModelLoadError, match="needs its diffusers config folder") as caught:
        load_sdxl_pipeline(path)
    assert str(tmp_path / "mine") in str(caught.value)
    with pytest.raises(ModelLoadError, match="needs its diffusers config folder"):
        load_sdxl_pipeline(path, config_dir=tmp_path / "elsewhere")


def test_single_file_configs_default_to_the_folder_named_like_the_file(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "mine.safetensors", SDXL_KEYS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model_index.json").write_text("{}")
    calls = []

    def fake_from_single_file(cls, file, **kwargs):
        calls.append((file, kwargs))
        return "pipeline"

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake_from_single_file))
    assert load_sdxl_pipeline(path) == "pipeline"
    assert calls[0][0] == str(path)
    assert calls[0][1]["config"] == str(tmp_path / "mine")
    assert calls[0][1]["local_files_only"] is True


# --- refused folders ----------------------------------------------------------------------------------------


def model_folder(path: Path, index) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return path


def test_sd1_diffusers_folder_is_refused(tmp_path):
    folder = model_folder(tmp_path / "sd15", {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]})
    with pytest.raises(ModelLoadError) as caught:
        load_sdxl_pipeline(folder)
    message = str(caught.value)
    assert "StableDiffusionPipeline" in message and "1.x or 2.x" in message and "not SDXL" in message


@pytest.mark.parametrize("class_name", ["FluxPipeline", "StableDiffusion3Pipeline", "StableDiffusionXLImg2ImgPipeline"])
def test_other_diffusers_folders_are_refused(tmp_path, class_name):
    folder = model_folder(tmp_path / "other", {"_class_name": class_name})
    with pytest.raises(ModelLoadError, match=f"this is a {class_name} folder, not SDXL"):
        load_sdxl_pipeline(folder)


@pytest.mark.parametrize("index", ["{oops", "[1, 2]", "\xff"], ids=["bad-json", "not-object", "bad-utf8"])
def test_unreadable_model_index(tmp_path, index):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_bytes(index.encode("latin-1"))
    with pytest.raises(ModelLoadError, match="not a readable diffusers model_index.json"):
        load_sdxl_pipeline(folder)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_sdxl_pipeline(tmp_path)


# --- the tiny model -----------------------------------------------------------------------------------------


def test_folder_and_single_file_load_identical_weights(tiny_dir):
    from_folder = load_sdxl_pipeline(tiny_dir)
    from_file = load_sdxl_pipeline(tiny_dir / TINY_CHECKPOINT_NAME, config_dir=tiny_dir)
    assert isinstance(from_folder, StableDiffusionXLPipeline) and isinstance(from_file, StableDiffusionXLPipeline)
    for name in COMPONENTS:
        expected, actual = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert expected.keys() == actual.keys(), name
        for key, tensor in expected.items():
            other = actual[key]
            assert not other.is_meta, f"{name}.{key} was never loaded"
            assert other.dtype == tensor.dtype == torch.float32, f"{name}.{key}"
            assert torch.equal(other, tensor), f"{name}.{key}"


# --- built-in models ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_builds(monkeypatch) -> list[Path]:
    """save_tiny_model replaced by one that writes only model_index.json and records where it wrote."""
    builds = []

    def fake_save_tiny_model(out_dir: Path, seed: int = 0) -> Path:
        builds.append(Path(out_dir))
        (Path(out_dir) / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
        return Path(out_dir)

    monkeypatch.setattr(trainer.builtin.tiny, "save_tiny_model", fake_save_tiny_model)
    return builds


def test_builtin_is_built_once_into_the_cache(tmp_path, fake_builds):
    folder = resolve_builtin("builtin:tiny-sdxl", tmp_path)
    assert folder == tmp_path / "models" / "tiny-sdxl-seed0"
    assert (folder / "model_index.json").is_file()
    assert len(fake_builds) == 1 and fake_builds[0].parent == folder.parent and fake_builds[0] != folder
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-sdxl-seed0"]  # no staging folder left
    assert resolve_builtin("builtin:tiny-sdxl", tmp_path) == folder
    assert len(fake_builds) == 1


def test_failed_builtin_build_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(out_dir: Path, seed: int = 0) -> Path:
        (Path(out_dir) / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.builtin.tiny, "save_tiny_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        resolve_builtin("builtin:tiny-sdxl", tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_builtin(tmp_path, fake_builds):
    with pytest.raises(ModelLoadError, match="unknown built-in model") as caught:
        resolve_builtin("builtin:huge-sdxl", tmp_path)
    assert "builtin:huge-sdxl" in str(caught.value) and "builtin:tiny-sdxl" in str(caught.value)
    assert fake_builds == [] and not (tmp_path / "models").exists()


def test_model_path_resolution(tmp_path, monkeypatch, fake_builds):
    monkeypatch.setenv("DORA_STUDIO_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    assert resolve_model_path("builtin:tiny-sdxl") == tmp_path / "cache" / "models" / "tiny-sdxl-seed0"
    assert resolve_model_path("/models/sdxl.safetensors") == Path("/models/sdxl.safetensors")
    monkeypatch.delenv("DORA_STUDIO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dora-studio"
