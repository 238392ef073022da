"""The kohya adapter file: round trips, hashing, layouts, bad inputs, and files written by LyCORIS."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lycoris import create_lycoris
from torch import Tensor, nn

from trainer.adapters.dora_norm import weight_norm
from trainer.adapters.weights import AdapterWeights, merged_weight
from trainer.errors import AdapterFileError
from trainer.kohya.adapter_file import load_adapter, rename_stems, save_adapter
from trainer.kohya.metadata import build_metadata

METADATA = {"ss_output_name": "test", "modelspec.title": "Test ünïcode"}


def sample_adapters() -> dict[str, AdapterWeights]:
    """LoRA, input- and output-axis DoRA, on Linear and conv stems."""
    gen = torch.Generator().manual_seed(0)
    linear, conv = torch.randn(24, 16, generator=gen), torch.randn(8, 6, 3, 3, generator=gen)

    def adapter(base: Tensor, axis: str | None, alpha: float) -> AdapterWeights:
        down = torch.randn(4, *base.shape[1:], generator=gen)
        up = torch.randn(base.shape[0], 4, *[1] * (base.dim() - 2), generator=gen)
        return AdapterWeights(down, up, alpha, None if axis is None else weight_norm(base, axis) * 1.1)

    return {
        "lora_unet_lora_linear": adapter(linear, None, 3.0),
        "lora_unet_dora_in_linear": adapter(linear, "input", 0.3),
        "lora_unet_dora_out_linear": adapter(linear, "output", 2.0),
        "lora_unet_dora_in_conv": adapter(conv, "input", 4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": adapter(linear, None, 1.0),
    }


def file_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return header_len, json.loads(raw[8 : 8 + header_len])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_load_save_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_adapter(first, sample_adapters(), METADATA, dtype)
    loaded = load_adapter(first)
    save_adapter(second, loaded.adapters, loaded.metadata, dtype)
    assert first.read_bytes() == second.read_bytes()
    assert loaded.metadata == {**METADATA, "sshs_model_hash": loaded.metadata["sshs_model_hash"]}
    assert loaded.unknown_keys == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temp files


def test_layouts_and_dtypes_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_adapter(path, sample_adapters(), METADATA, torch.bfloat16)
    _, header = file_header(path)
    keys = [k for k in header if k != "__metadata__"]
    assert keys == sorted(keys)
    for key, entry in header.items():
        if key.endswith(".alpha"):
            assert entry["shape"] == []
        if key.endswith(".dora_scale"):
            assert len(entry["shape"]) in (2, 4)
            assert entry["dtype"] == "F32"  # never bf16
        if key.endswith(".weight"):
            assert entry["dtype"] == "BF16"
    loaded = load_adapter(path)
    assert loaded.adapters["lora_unet_dora_in_linear"].dora_axis == "input"
    assert loaded.adapters["lora_unet_dora_out_linear"].dora_axis == "output"
    assert loaded.adapters["lora_unet_dora_in_conv"].dora_axis == "input"
    assert loaded.adapters["lora_unet_dora_in_linear"].alpha == pytest.approx(0.3, rel=1e-7)  # alpha kept fp32
    assert loaded.dtypes["lora_unet_dora_in_conv.lora_down.weight"] == "bfloat16"


def test_sshs_model_hash_is_sha256_after_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_adapter(path, sample_adapters(), METADATA)
    header_len, header = file_header(path)
    after_header = path.read_bytes()[8 + header_len :]
    assert header["__metadata__"]["sshs_model_hash"] == hashlib.sha256(after_header).hexdigest()
    # kohya's precalculate_safetensors_hashes hashes safetensors' own save with the ss_* metadata.
    tensors = safetensors.torch.load_file(path)
    kohya_blob = safetensors.torch.save(tensors, {"ss_output_name": "test"})
    kohya_len = int.from_bytes(kohya_blob[:8], "little")
    assert hashlib.sha256(kohya_blob[8 + kohya_len :]).hexdigest() == header["__metadata__"]["sshs_model_hash"]


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(TypeError, match="ss_steps"):
        save_adapter(path, sample_adapters(), {"ss_steps": 10})  # type: ignore[dict-item]
    one_d = sample_adapters()
    one_d["lora_unet_dora_in_linear"].dora_scale = torch.ones(16)
    with pytest.raises(ValueError, match="lora_unet_dora_in_linear"):
        save_adapter(path, one_d, METADATA)
    save_adapter(path, sample_adapters(), METADATA)
    before = path.read_bytes()
    nan = sample_adapters()
    nan["lora_unet_lora_linear"].up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lora_unet_lora_linear"):
        save_adapter(path, nan, METADATA)
    overflow = sample_adapters()  # finite in fp32, Inf once cast to fp16
    overflow["lora_unet_lora_linear"].down[0, 0] = 1e6
    with pytest.raises(ValueError, match="lora_unet_lora_linear"):
        save_adapter(path, overflow, METADATA, torch.float16)
    assert path.read_bytes() == before  # a failed save leaves the old file alone


class _CreatesMarker:
    """Unpickling this creates a file: proof of whether a loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.safetensors", "evil.pt"])
def test_pickles_are_refused_without_unpickling(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"a": 1, "b": _CreatesMarker(marker)})
    pickle.loads(pickle.dumps(_CreatesMarker(tmp_path / "proof"))).close()
    assert (tmp_path / "proof").exists()  # the payload does work when unpickled
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(AdapterFileError, match="pickle") as err:
        load_adapter(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(path)


def test_torch_zip_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(path)


def write_raw(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    safetensors.torch.save_file({key: t.clone() for key, t in tensors.items()}, path, metadata)
    return path


def lora_pair(out_features: int = 6, in_features: int = 5, rank: int = 2) -> tuple[Tensor, Tensor]:
    return torch.randn(rank, in_features), torch.randn(out_features, rank)


def test_corrupt_files_raise_naming_the_file(tmp_path: Path) -> None:
    down, up = lora_pair()
    good = write_raw(tmp_path / "good.safetensors", {"s.lora_down.weight": down, "s.lora_up.weight": up})
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-7],
        "empty": b"",
        "header cut": raw[:20],
        "garbage": b"\x01\x00\x00\x00\x00\x00\x00\x00hello world",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(AdapterFileError) as err:
            load_adapter(path)
        assert str(path) in str(err.value), name


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"s.lora_down.weight": torch.full((2, 5), float("nan")), "s.lora_up.weight": torch.ones(6, 2)}, "'s'.*NaN"),
        (
            {
                "s.lora_down.weight": torch.ones(2, 5),
                "s.lora_up.weight": torch.ones(6, 2),
                "s.dora_scale": torch.tensor([[float("inf")] * 5]),
            },
            "'s'.*NaN or Inf",
        ),
        ({"s.lora_down.weight": torch.ones(2, 5)}, "'s'.*lora_up"),
        ({"s.lora_up.weight": torch.ones(6, 2)}, "'s'.*lora_down"),
        ({"s.lora_down.weight": torch.ones(2, 5), "s.lora_up.weight": torch.ones(6, 3)}, r"'s'.*\(2, 5\).*\(6, 3\)"),
        ({"s.hada_w1_a": torch.ones(2, 2)}, "no LoRA/DoRA layers.*hada_w1_a"),
        ({}, "no LoRA/DoRA layers"),
        (
            {
                "s.lora_down.weight": torch.ones(2, 5),
                "s.lora_up.weight": torch.ones(6, 2),
                "s.dora_scale": torch.ones(3, 1),
            },
            r"s: dora_scale shape \(3, 1\)",
        ),
    ],
)
def test_bad_adapters_raise_naming_file_and_stem(tmp_path: Path, tensors: dict, match: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(AdapterFileError, match=match) as err:
        load_adapter(path)
    assert str(path) in str(err.value)


def test_unknown_keys_are_reported_by_name(tmp_path: Path) -> None:
    down, up = lora_pair()
    path = write_raw(
        tmp_path / "mixed.safetensors",
        {
            "lora_unet_a.lora_down.weight": down,
            "lora_unet_a.lora_up.weight": up,
            "lora_unet_b.hada_w1_a": torch.ones(2, 2),
            "lora_unet_b.alpha": torch.tensor(1.0),
            "lora_unet_c.diff": torch.ones(6, 5),
            "lora_unet_d.lora_down.weight": down,
            "lora_unet_d.lora_up.weight": up,
            "lora_unet_d.bias": torch.ones(6),
            "bundle_emb.token.string_to_param.*": torch.ones(1, 8),
        },
    )
    loaded = load_adapter(path)
    assert list(loaded.adapters) == ["lora_unet_a"]
    assert loaded.unknown_keys == sorted(
        [
            "lora_unet_b.hada_w1_a",
            "lora_unet_b.alpha",
            "lora_unet_c.diff",
            "lora_unet_d.bias",
            "lora_unet_d.lora_down.weight",
            "lora_unet_d.lora_up.weight",
            "bundle_emb.token.string_to_param.*",
        ]
    )  # a stem with a key we cannot merge (bias) is reported whole, not merged without it
    assert loaded.dtypes["lora_unet_c.diff"] == "float32"


def test_missing_alpha_means_gamma_one(tmp_path: Path) -> None:
    down, up = lora_pair(rank=3)
    loaded = load_adapter(write_raw(tmp_path / "a.safetensors", {"s.lora_down.weight": down, "s.lora_up.weight": up}))
    assert loaded.adapters["s"].alpha == 3.0 and loaded.adapters["s"].gamma == 1.0


@pytest.mark.parametrize(
    ("out_features", "in_features", "metadata", "axis"),
    [
        (6, 5, {}, "input"),  # length fits only in
        (5, 6, {}, "output"),  # length 5 fits only out
        (5, 5, {}, "input"),  # square: default input
        (5, 5, {"ss_network_args": json.dumps({"wd_on_output": "True"})}, "output"),
        (5, 5, {"wd_on_output": "True"}, "output"),
        (5, 5, {"dora_studio.dora_axis": "output", "ss_network_args": "{}"}, "output"),
    ],
)
def test_one_d_dora_scale_gets_an_axis(tmp_path: Path, out_features: int, in_features: int, metadata, axis) -> None:
    down, up = lora_pair(out_features, in_features)
    path = write_raw(
        tmp_path / "a.safetensors",
        {"s.lora_down.weight": down, "s.lora_up.weight": up, "s.dora_scale": torch.ones(5)},
        metadata,
    )
    weights = load_adapter(path).adapters["s"]
    assert weights.dora_axis == axis
    assert weights.dora_scale is not None and weights.dora_scale.dim() == 2


def test_peft_and_onetrainer_names_become_kohya_stems(tmp_path: Path) -> None:
    down, up = lora_pair()
    path = write_raw(
        tmp_path / "peft.safetensors",
        {
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": down,
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": up,
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,  # transformers >= 5.6 path
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_A.weight": down,
            "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_B.weight": up,
            "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_down.weight": down,  # OneTrainer / kohya
            "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight": up,
        },
    )
    loaded = load_adapter(path)
    assert sorted(loaded.adapters) == [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_1_mlp_fc2",
        "lora_te2_text_model_encoder_layers_3_mlp_fc1",
        "lora_unet_down_blocks_1_attentions_0_proj_in",
    ]
    renamed = rename_stems(
        loaded, {"lora_unet_down_blocks_1_attentions_0_proj_in": "lora_unet_input_blocks_4_1_proj_in"}
    )
    assert "lora_unet_input_blocks_4_1_proj_in" in renamed.adapters
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in renamed.dtypes
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in renamed.adapters
    with pytest.raises(AdapterFileError, match="both become"):
        rename_stems(
            loaded, {"lora_unet_down_blocks_1_attentions_0_proj_in": "lora_te1_text_model_encoder_layers_1_mlp_fc2"}
        )


def test_build_metadata_records_the_dora_axis() -> None:
    common = dict(
        dim=16,
        alpha=8.0,
        conv_dim=None,
        conv_alpha=None,
        output_name="out",
        base_model_name="sdxl.safetensors",
        steps=100,
        epoch=2,
        started_at=1_700_000_000.0,
        finished_at=1_700_003_600.0,
        mixed_precision="bf16",
        learning_rate=1e-4,
        unet_lr=1e-4,
        text_encoder_lr=None,
        tag_frequency={"dir": {"cat": 3}},
        dataset_dirs={"dir": {"n_repeats": 1, "img_count": 3}},
        resolution=(1024, 1024),
        title="T",
    )
    dora = build_metadata(network_kind="dora", dora_axis="output", extra={"ss_seed": "1"}, **common)
    assert all(isinstance(v, str) for v in dora.values())
    assert json.loads(dora["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    assert dora["dora_studio.dora_axis"] == "output" and dora["ss_network_module"] == "lycoris.kohya"
    assert dora["modelspec.resolution"] == "1024x1024" and dora["ss_seed"] == "1"
    lora = build_metadata(network_kind="lora", dora_axis=None, **{**common, "conv_dim": 4, "conv_alpha": 1.0})
    assert lora["ss_network_module"] == "networks.lora" and "dora_studio.dora_axis" not in lora
    assert json.loads(lora["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    with pytest.raises(ValueError):
        build_metadata(network_kind="dora", dora_axis=None, **common)


@pytest.mark.parametrize("wd_on_output", [False, True])
def test_lycoris_written_file(tmp_path: Path, wd_on_output: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
    network = create_lycoris(
        model, 1.0, linear_dim=4, linear_alpha=2.0, algo="lora", dora_wd=True, wd_on_output=wd_on_output
    )
    network.apply_to()
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.normal_(0, 0.3)
            module.dora_scale.mul_(0.8 + 0.4 * torch.rand(module.dora_scale.shape))
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {})
    loaded = load_adapter(path)
    assert sorted(loaded.adapters) == sorted(module.lora_name for module in network.loras)
    for module in network.loras:
        weights = loaded.adapters[module.lora_name]
        assert weights.dora_axis == ("output" if wd_on_output else "input")
        with torch.no_grad():
            expected, _ = module.get_merged_weight(multiplier=1.0)
        actual = merged_weight(module.org_weight.detach(), weights)
        assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-6
