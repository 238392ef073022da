"""The settings schema, presets with ``base`` inheritance, ``--set`` overrides, the settings docs and the CLI's
handling of bad settings."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.config.docs import settings_markdown, settings_text
from trainer.config.parsing import from_dict, to_dict
from trainer.config.presets import (
    apply_overrides,
    config_toml,
    load_config,
    preset_purpose,
    read_preset,
    write_config,
)
from trainer.config.schema import SECTIONS, TrainConfig, all_keys, fields_of
from trainer.errors import ConfigError, Problem

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "presets").glob("*.toml"))
DATASET = {"dataset": {"path": "/data/images"}}


def problems_of(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        from_dict(data)
    return str(caught.value)


def with_dataset(**sections) -> dict:
    """Settings that are valid apart from what the test puts in ``sections``."""
    data = {"dataset": {"path": "/data/images"}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- the schema ---------------------------------------------------------------------------------------------


def test_defaults_need_only_a_dataset():
    message = problems_of({})
    assert "dataset.path" in message
    assert len(message.strip().splitlines()) == 2  # the "settings:" heading and the one problem
    assert TrainConfig().problems() == [
        Problem(
            "dataset.path",
            "missing; set it to the folder of your training images (or add a [[dataset.subsets]] table)",
        )
    ]
    assert from_dict(DATASET).dataset.path == "/data/images"


def test_every_setting_has_help_and_a_default_of_its_type():
    defaults = TrainConfig()
    for section_name, section in SECTIONS.items():
        for spec in fields_of(section):
            key = f"{section_name}.{spec.name}"
            assert spec.metadata["help"].strip(), key
            value = getattr(getattr(defaults, section_name), spec.name)
            for choice in spec.metadata["choices"]:
                assert isinstance(choice, str), key
            if spec.metadata["choices"]:
                assert value in spec.metadata["choices"], key
    assert len(all_keys()) == len(set(all_keys()))


@pytest.mark.parametrize(
    ("section", "name", "value", "expected"),
    [
        ("network", "kind", "loha", "'loha' is not one of dora, lora"),
        ("network", "rank", 0, "0 is below the minimum 1"),
        ("network", "rank", 2048, "2048 is above the maximum 1024"),
        ("optimizer", "learning_rate", -1, "-1.0 is below the minimum 0.0"),
        ("optimizer", "unet_lr", -1e-4, "-0.0001 is below the minimum 0.0"),
        ("dataset", "caption_dropout", 1.5, "1.5 is above the maximum 1.0"),
        ("training", "mixed_precision", "fp8", "'fp8' is not one of no, fp16, bf16"),
    ],
)
def test_choices_and_bounds_are_enforced(section, name, value, expected):
    message = problems_of(with_dataset(**{section: {name: value}}))
    assert f"{section}.{name}: {expected}" in message


@pytest.mark.parametrize(
    ("section", "name", "value", "expected"),
    [
        ("network", "rank", "8", "an integer"),
        ("network", "rank", 8.5, "an integer"),
        ("network", "rank", 8.0, "an integer"),
        ("network", "rank", True, "an integer"),
        ("network", "train_text_encoders", 1, "true or false"),
        ("optimizer", "learning_rate", True, "a number"),
        ("optimizer", "learning_rate", "1e-4", "a number"),
        ("optimizer", "unet_lr", "fast", "a number"),
        ("dataset", "trigger_word", ["zqx"], "text"),
        ("dataset", "trigger_word", 123, "text"),
        ("network", "include", "attn", "a list of text"),
        ("network", "include", [1], "a list of text"),
        ("optimizer", "betas", [0.9, "x"], "a list of number"),
        ("network", "alpha", float("nan"), "a finite number"),
        ("optimizer", "learning_rate", float("inf"), "a finite number"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(section, name, value, expected):
    message = problems_of(with_dataset(**{section: {name: value}}))
    assert f"{section}.{name}: expected {expected}, got " in message


def test_all_problems_are_reported_together():
    message = problems_of(
        {
            "network": {"rank": "8", "kind": "loha", "rnak": 4},
            "optimizer": {"learning_rate": -1},
            "dataset": {"path": "/data", "caption_dropout": 1.5},
            "trainig": {"epochs": 2},
        }
    )
    for key in (
        "network.rank",
        "network.kind",
        "network.rnak",
        "optimizer.learning_rate",
        "dataset.caption_dropout",
        "[trainig]",
    ):
        assert key in message
    assert len(message.strip().splitlines()) == 1 + 6


def test_cross_setting_rules():
    message = problems_of(
        with_dataset(
            dataset={"resolution": 4096, "max_bucket_side": 2048, "background_colour": "white"},
            optimizer={"betas": [0.9, 1.5]},
            saving={"output_name": "runs/a", "export_rank": 16},
            network={"include": ["(unclosed"]},
        )
    )
    for key in (
        "dataset.resolution",
        "dataset.background_colour",
        "optimizer.betas",
        "saving.output_name",
        "network.include",
    ):
        assert key in message
    assert "saving.export_rank: 16 is not below network.rank (16)" in message


def test_unknown_keys_and_sections():
    message = problems_of(with_dataset(network={"rnak": 4}))
    assert "network.rnak: unknown setting; did you mean network.rank?" in message
    message = problems_of(with_dataset(netwrk={"rank": 4}))
    assert "[netwrk]: unknown section" in message and "network" in message
    message = problems_of(with_dataset(network={"qqqqqqqqqqqqqqqqqqqqqq": 4}))
    assert "network.qqqqqqqqqqqqqqqqqqqqqq: unknown setting; `dora-studio settings` lists them all" in message
    message = problems_of({**DATASET, "network": 4})
    assert "network: expected a [network] table" in message


def test_ints_are_accepted_for_floats():
    config = from_dict(with_dataset(network={"alpha": 8}, optimizer={"learning_rate": 1, "betas": [0, 0]}))
    assert config.network.alpha == 8.0 and type(config.network.alpha) is float
    assert type(config.optimizer.learning_rate) is float
    assert config.optimizer.betas == [0.0, 0.0] and all(type(b) is float for b in config.optimizer.betas)


def test_optional_learning_rates():
    config = from_dict(DATASET)
    assert config.optimizer.unet_lr is None and config.optimizer.text_encoder_1_lr is None
    assert "unet_lr" not in to_dict(config)["optimizer"]
    config = from_dict(with_dataset(optimizer={"unet_lr": 2, "text_encoder_2_lr": 1e-5}))
    assert config.optimizer.unet_lr == 2.0 and config.optimizer.text_encoder_2_lr == 1e-5
    assert to_dict(config)["optimizer"]["unet_lr"] == 2.0


def test_config_round_trips_through_toml(tmp_path):
    config = from_dict(
        with_dataset(
            network={"kind": "lora", "rank": 8, "include": ["attn1", "to_q"]},
            optimizer={"unet_lr": 1e-4, "betas": [0.8, 0.99]},
            dataset={"trigger_word": "zqx", "caption_dropout": 0.1},
            sampling={"prompts": ["a cat --n blurry"]},
        )
    )
    assert from_dict(tomllib.loads(config_toml(config))) == config
    assert from_dict(to_dict(config)) == config
    write_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config


# --- presets ------------------------------------------------------------------------------------------------


def test_base_inheritance(tmp_path):
    write(tmp_path / "base.toml", '[network]\nrank = 8\nalpha = 2.0\nkind = "lora"\n[dataset]\npath = "/data"\n')
    child = write(tmp_path / "child.toml", 'base = "base.toml"\n[network]\nrank = 32\n[training]\nepochs = 3\n')
    data = read_preset(child)
    assert data["network"] == {"rank": 32, "alpha": 2.0, "kind": "lora"}
    assert data["training"] == {"epochs": 3}
    assert data["dataset"] == {"path": "/data"}
    assert "base" not in data
    config = load_config(child)
    assert (config.network.rank, config.network.alpha, config.network.kind) == (32, 2.0, "lora")
    assert config.training.epochs == 3 and config.training.batch_size == 1


def test_chain_of_three(tmp_path):
    write(tmp_path / "a.toml", '[network]\nrank = 4\nalpha = 1.0\n[training]\nepochs = 5\n[dataset]\npath = "/d"\n')
    write(tmp_path / "b.toml", 'base = "a.toml"\n[network]\nalpha = 2.0\n[training]\nbatch_size = 2\n')
    c = write(tmp_path / "c.toml", 'base = "b.toml"\n[training]\nepochs = 7\n')
    config = load_config(c)
    assert (config.network.rank, config.network.alpha) == (4, 2.0)
    assert (config.training.epochs, config.training.batch_size) == (7, 2)


def test_base_cycle_is_named(tmp_path):
    write(tmp_path / "a.toml", 'base = "b.toml"\n')
    write(tmp_path / "b.toml", 'base = "c.toml"\n')
    write(tmp_path / "c.toml", 'base = "a.toml"\n')
    with pytest.raises(ConfigError, match="loop") as caught:
        read_preset(tmp_path / "a.toml")
    assert "a.toml -> b.toml -> c.toml -> a.toml" in str(caught.value)
    write(tmp_path / "self.toml", 'base = "self.toml"\n')
    with pytest.raises(ConfigError, match="loop"):
        read_preset(tmp_path / "self.toml")


def test_missing_base_and_bad_base(tmp_path):
    child = write(tmp_path / "child.toml", 'base = "gone.toml"\n')
    with pytest.raises(ConfigError, match="gone.toml: preset file not found"):
        read_preset(child)
    write(child, "base = 3\n")
    with pytest.raises(ConfigError, match="base: expected a file name"):
        read_preset(child)
    with pytest.raises(ConfigError, match="nothere.toml: preset file not found"):
        read_preset(tmp_path / "nothere.toml")


def test_invalid_toml_names_the_file(tmp_path):
    write(tmp_path / "base.toml", "[network\nrank = 4\n")
    child = write(tmp_path / "child.toml", 'base = "base.toml"\n')
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        read_preset(child)
    assert str(tmp_path / "base.toml") in str(caught.value)


def test_non_utf8_preset(tmp_path):
    preset = tmp_path / "latin1.toml"
    preset.write_bytes('[dataset]\ntrigger_word = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        read_preset(preset)
    assert str(preset) in str(caught.value)


def test_utf8_bom_is_accepted(tmp_path):
    preset = tmp_path / "bom.toml"
    preset.write_bytes('[dataset]\ntrigger_word = "caf\u00e9"\n'.encode("utf-8-sig"))
    assert read_preset(preset)["dataset"]["trigger_word"] == "caf\u00e9"


def test_relative_paths_follow_each_preset_file(tmp_path):
    write(
        tmp_path / "shared" / "base.toml",
        '[model]\npath = "models/base.safetensors"\n[dataset]\npath = "images"\nlatent_cache_dir = "/abs/cache"\n'
        '[sampling]\nprompt_file = "prompts.txt"\n',
    )
    child = write(tmp_path / "mine" / "child.toml", 'base = "../shared/base.toml"\n[dataset]\npath = "../data/cats"\n')
    data = read_preset(child)
    assert data["model"]["path"] == str(tmp_path / "shared" / "models" / "base.safetensors")
    assert data["sampling"]["prompt_file"] == str(tmp_path / "shared" / "prompts.txt")
    assert data["dataset"]["path"] == str(tmp_path / "data" / "cats")
    assert data["dataset"]["latent_cache_dir"] == "/abs/cache"


def test_builtin_absolute_and_empty_paths_are_untouched(tmp_path):
    preset = write(
        tmp_path / "p.toml",
        '[model]\npath = "builtin:tiny-sdxl"\nconfig_dir = ""\n[dataset]\npath = "/srv/data"\ntrigger_word = "x/y"\n',
    )
    data = read_preset(preset)
    assert data["model"] == {"path": "builtin:tiny-sdxl", "config_dir": ""}
    assert data["dataset"] == {"path": "/srv/data", "trigger_word": "x/y"}


def test_preset_path_given_relative_to_cwd(tmp_path, monkeypatch):
    write(tmp_path / "presets" / "p.toml", '[dataset]\npath = "imgs"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("presets/p.toml").dataset.path == str(tmp_path / "presets" / "imgs")


# --- --set overrides ----------------------------------------------------------------------------------------


def test_overrides_parse_toml_values():
    data = apply_overrides(
        DATASET,
        [
            "network.rank=8",
            "optimizer.learning_rate=3e-4",
            "network.train_text_encoders=true",
            "network.include=['attn1', 'to_k']",
            "network.kind=lora",
            "dataset.trigger_word=zqx star",
            "optimizer.unet_lr = 1",
            "optimizer.betas=[0.8, 0.9]",
            'saving.output_name="quoted"',
        ],
    )
    config = from_dict(data)
    assert config.network.rank == 8
    assert config.optimizer.learning_rate == 3e-4
    assert config.network.train_text_encoders is True
    assert config.network.include == ["attn1", "to_k"]
    assert config.network.kind == "lora"
    assert config.dataset.trigger_word == "zqx star"
    assert config.optimizer.unet_lr == 1.0
    assert config.optimizer.betas == [0.8, 0.9]
    assert config.saving.output_name == "quoted"
    assert DATASET == {"dataset": {"path": "/data/images"}}  # the input is not changed


def test_text_settings_keep_number_looking_values():
    config = from_dict(
        apply_overrides(DATASET, ["dataset.trigger_word=123", "saving.output_name=1e3", "dataset.tag_separator=true"])
    )
    assert config.dataset.trigger_word == "123"
    assert config.saving.output_name == "1e3"
    assert config.dataset.tag_separator == "true"


def test_override_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    preset = write(tmp_path / "presets" / "p.toml", '[dataset]\npath = "in-preset"\n')
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config = load_config(preset, ["dataset.path=my-images", "model.path=builtin:tiny-sdxl"])
    assert config.dataset.path == str(workdir / "my-images")
    assert config.model.path == "builtin:tiny-sdxl"
    assert load_config(preset).dataset.path == str(tmp_path / "presets" / "in-preset")


def test_override_last_one_wins_and_beats_the_preset(tmp_path):
    preset = write(tmp_path / "p.toml", '[network]\nrank = 4\nalpha = 3.0\n[dataset]\npath = "/d"\n')
    config = load_config(preset, ["network.rank=8", "network.rank=12"])
    assert (config.network.rank, config.network.alpha) == (12, 3.0)


def test_bad_overrides_are_named():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(DATASET, ["network.rnak=4", "network.rank", "trainig.epochs=3"])
    message = str(caught.value)
    assert "network.rnak: unknown setting; did you mean network.rank?" in message
    assert "--set network.rank: write it as section.name=value" in message
    assert "trainig.epochs" in message and "training.epochs" in message


def test_override_with_wrong_type_is_named(tmp_path):
    preset = write(tmp_path / "p.toml", '[dataset]\npath = "/d"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(preset, ["network.rank=eight", "network.train_text_encoders=yes", "optimizer.betas=0.9"])
    message = str(caught.value)
    assert str(preset) in message
    assert "network.rank: expected an integer, got 'eight'" in message
    assert "network.train_text_encoders: expected true or false, got 'yes'" in message
    assert "optimizer.betas: expected a list of number, got 0.9" in message


# --- the shipped presets ------------------------------------------------------------------------------------


def test_presets_exist():
    assert any(p.name == "quickstart.toml" for p in PRESETS)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset)
    assert config.problems() == []
    assert config.dataset.path  # paths may be placeholders for real-SDXL presets, but are set and absolute
    for key in ("model.path", "dataset.path"):
        section, _, name = key.partition(".")
        value = getattr(getattr(config, section), name)
        assert value.startswith("builtin:") or Path(value).is_absolute(), (preset.name, key, value)


def test_quickstart_points_at_the_example_dataset_and_toy_model():
    config = load_config(REPO / "presets" / "quickstart.toml")
    assert config.dataset.path == str((REPO / "datasets_example").resolve())
    assert Path(config.dataset.path).is_dir()
    assert config.model.path == "builtin:toy-sdxl"
    # trained as it was pretrained (trainer.builtin.toy_pretrain); anything else is refused at start
    assert (config.model.prediction_type, config.model.zero_terminal_snr) == ("v_prediction", True)


# --- caches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "name", "value", "disabled"),
    [
        ("dataset", "random_crop", True, "dataset.cache_latents"),
        ("network", "train_text_encoders", True, "dataset.cache_text_encoder_outputs"),
        ("dataset", "shuffle_tags", True, "dataset.cache_text_encoder_outputs"),
        ("dataset", "caption_dropout", 0.1, "dataset.cache_text_encoder_outputs"),
        ("dataset", "tag_dropout", 0.1, "dataset.cache_text_encoder_outputs"),
    ],
)
def test_cache_conflicts_name_the_option(section, name, value, disabled):
    config = from_dict(with_dataset(**{section: {name: value}}))
    notes = config.cache_conflicts()
    assert len(notes) == 1
    assert notes[0].startswith(f"{section}.{name} disables {disabled}")


def test_no_cache_conflicts_by_default_or_with_caches_off():
    assert from_dict(DATASET).cache_conflicts() == []
    config = from_dict(
        with_dataset(
            dataset={
                "random_crop": True,
                "shuffle_tags": True,
                "cache_latents": False,
                "cache_text_encoder_outputs": False,
            }
        )
    )
    assert config.cache_conflicts() == []


# --- settings docs ------------------------------------------------------------------------------------------


def test_settings_markdown_has_one_row_per_setting():
    lines = settings_markdown().splitlines()
    assert lines[:2] == ["| setting | default | meaning |", "|---|---|---|"]
    rows = [line.split("|")[1].strip().strip("`") for line in lines[2:]]
    assert rows == all_keys(tables=True)
    assert set(all_keys()) < set(rows)
    assert "dataset.subsets[].repeats" in rows
    assert "| `network.rank` | `16` |" in settings_markdown()
    assert "| `optimizer.unet_lr` | `(unset)` |" in settings_markdown()
    assert "(one of: dora, lora, dvora, vera)" in settings_markdown()


def test_settings_text_lists_every_setting():
    lines = settings_text().splitlines()
    assert [line.split()[0] for line in lines] == all_keys(tables=True)


def test_docs_have_the_current_settings_table():
    reference = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert settings_markdown() in reference, (
        "docs/settings.md is stale: paste `dora-studio settings --markdown` into it"
    )


# --- the CLI ------------------------------------------------------------------------------------------------


def test_train_with_missing_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "nonexistent.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nonexistent.toml" in err and "not found" in err
    assert list(tmp_path.iterdir()) == []


def test_train_with_bad_set_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = main(
        ["train", str(REPO / "presets" / "quickstart.toml"), "--set", "network.rnak=4", "--run-dir", str(run_dir)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "network.rnak" in err and "did you mean network.rank?" in err
    assert "Traceback" not in err
    assert not run_dir.exists() or list(run_dir.iterdir()) == []
    assert list(tmp_path.iterdir()) in ([], [run_dir])


def test_train_with_bad_value_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(REPO / "presets" / "quickstart.toml"), "--set", "network.rank=0"])
    assert code == 2
    assert "network.rank: 0 is below the minimum 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no runs/ folder either


@pytest.mark.parametrize("markdown", [False, True])
def test_settings_command_prints_every_key(markdown, capsys):
    assert main(["settings", "--markdown"] if markdown else ["settings"]) == 0
    out = capsys.readouterr().out
    for key in all_keys():
        assert key in out


def test_schema_sections_are_the_config_sections():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(SECTIONS)


def test_a_presets_purpose_is_its_first_comment_sentence(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("# For 8 GB cards: QDoRA. Needs torchao.\n# more\n[network]\n", encoding="utf-8")
    assert preset_purpose(preset) == "For 8 GB cards: QDoRA"
    assert preset_purpose(preset, limit=10) == "For 8 GB…"
    preset.write_text("[network]\nrank = 4\n", encoding="utf-8")
    assert preset_purpose(preset) == ""
    assert all(preset_purpose(path) for path in (REPO / "presets").glob("*.toml"))  # every shipped preset says
