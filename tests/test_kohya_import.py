"""Importing kohya's configs: the dataset-config examples of sd-scripts' docs/config_README-en.md (in our own
words and values), an sd-scripts training TOML, a kohya_ss GUI .json, the command and bad input.

Expected values follow kohya's rules as library/config_util.py implements them: a subset's option comes from
the subset, else its dataset, else [general], else the training config, else kohya's default.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.config.kohya_import import import_kohya, is_kohya_config, load_preset_or_kohya
from trainer.config.parsing import from_dict
from trainer.config.presets import load_config
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, name: str, images: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for index in range(images):
        (folder / f"{index}.png").write_bytes(b"")
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _notes(imported) -> str:
    return "\n".join(imported.notes)


def test_dreambooth_and_fine_tuning_datasets_as_in_the_readme_example(tmp_path):
    """The README's first example: [general] defaults, a dataset overriding keep_tokens, subsets with class
    tokens (one regularization), and a fine-tuning dataset at another resolution."""
    for name in ("alice", "bob", "people", "frames"):
        _folder(tmp_path, name, 4)
    config = _write(
        tmp_path / "dataset.toml",
        """
        [general]
        shuffle_caption = true
        caption_extension = ".txt"
        keep_tokens = 1
        enable_bucket = true

        [[datasets]]
        resolution = 768
        batch_size = 3
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = "alice"
          class_tokens = "alice woman"

          [[datasets.subsets]]
          image_dir = "bob"
          class_tokens = "bob man"
          keep_tokens = 4

          [[datasets.subsets]]
          is_reg = true
          image_dir = "people"
          class_tokens = "person"
          keep_tokens = 1

        [[datasets]]
        resolution = [1024, 1024]
        batch_size = 1

          [[datasets.subsets]]
          image_dir = "frames"
          metadata_file = "frames.json"
        """,
    )
    imported = import_kohya(config)
    dataset = from_dict(imported.settings).dataset
    assert (dataset.resolution, dataset.caption_extension, dataset.shuffle_tags) == (768, ".txt", True)
    assert from_dict(imported.settings).training.batch_size == 3
    assert dataset.keep_tokens == 2  # the dataset's, which its first subset takes
    subsets = dataset.subsets
    assert [Path(s.path).name for s in subsets] == ["alice", "bob", "people"]
    assert [s.role for s in subsets] == ["train", "train", "regularization"]
    assert [s.class_tokens for s in subsets] == ["alice woman", "bob man", "person"]
    assert [s.keep_tokens for s in subsets] == [None, 4, 1]  # None: the dataset's 2
    assert [s.repeats for s in subsets] == [1, 1, 1]  # kohya's default num_repeats
    assert "not carried over: datasets[1].subsets[0]: a fine-tuning subset" in _notes(imported)
    assert "relative path, taken against the config's folder" in _notes(imported)


def test_the_lowest_level_wins_down_to_the_training_config(tmp_path):
    """subset > dataset > [general] > training config, option by option (config_util.search_value)."""
    for name in ("a", "b", "c"):
        _folder(tmp_path, name, 2)
    training = _write(
        tmp_path / "train.toml",
        'network_module = "networks.lora"\ncaption_tag_dropout_rate = 0.2\nflip_aug = true\nkeep_tokens = 5\n',
    )
    config = _write(
        tmp_path / "dataset.toml",
        """
        [general]
        flip_aug = false
        num_repeats = 3
        caption_dropout_rate = 0.1

        [[datasets]]
        caption_dropout_rate = 0.05
        caption_extension = ".txt"

          [[datasets.subsets]]
          image_dir = "a"
          shuffle_caption = true

          [[datasets.subsets]]
          image_dir = "b"
          flip_aug = true
          num_repeats = 10
          caption_tag_dropout_rate = 0.0

          [[datasets.subsets]]
          image_dir = "c"
          caption_dropout_rate = 0.3
        """,
    )
    dataset = from_dict(import_kohya(config, training).settings).dataset
    assert (dataset.flip, dataset.caption_dropout, dataset.tag_dropout, dataset.keep_tokens) == (False, 0.05, 0.2, 5)
    a, b, c = dataset.subsets
    assert [a.repeats, b.repeats, c.repeats] == [3, 10, 3]  # [general]'s num_repeats, b's own
    assert (a.flip, b.flip, c.flip) == (None, True, None)
    assert (a.tag_dropout, b.tag_dropout, c.tag_dropout) == (None, 0.0, None)
    assert (a.caption_dropout, c.caption_dropout) == (None, 0.3)
    assert (dataset.shuffle_tags, a.shuffle_tags, b.shuffle_tags, c.shuffle_tags) == (True, None, False, False)


def test_caption_extension_is_kohya_s_default_when_nothing_sets_it(tmp_path):
    _folder(tmp_path, "images", 1)
    config = _write(tmp_path / "d.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "images"\n')
    imported = import_kohya(config)
    assert imported.settings["dataset"]["caption_extension"] == ".caption"
    assert "kohya's default: caption_extension: not set: kohya reads .caption" in _notes(imported)
    assert "changed: enable_bucket: off (kohya's default): kohya crops every image" in _notes(imported)


def test_separators_wildcards_and_prefixes_as_in_the_readme_example(tmp_path):
    """The README's last example: [general] augmentations and resolution, caption options on the dataset, and a
    subset with a caption prefix and suffix around kohya's keep-tokens separator."""
    _folder(tmp_path, "shots", 3)
    config = _write(
        tmp_path / "d.toml",
        """
        [general]
        flip_aug = true
        color_aug = false
        resolution = [896, 896]

        [[datasets]]
        batch_size = 5
        enable_bucket = true
        bucket_no_upscale = true
        caption_extension = ".txt"
        keep_tokens_separator = "###"
        shuffle_caption = true
        caption_tag_dropout_rate = 0.15
        secondary_separator = ";;"
        enable_wildcard = true

          [[datasets.subsets]]
          image_dir = "shots"
          num_repeats = 4
          caption_prefix = "1boy, kaito, original ###"
          caption_suffix = ", from above ### best quality"
        """,
    )
    imported = import_kohya(config)
    config_loaded = from_dict(imported.settings)
    dataset = config_loaded.dataset
    assert (dataset.resolution, dataset.bucket_no_upscale, config_loaded.training.batch_size) == (896, True, 5)
    assert (dataset.flip, dataset.shuffle_tags, dataset.tag_dropout) == (True, True, 0.15)
    assert dataset.trigger_word == "1boy, kaito, original" and dataset.subsets[0].repeats == 4
    notes = _notes(imported)
    for key in ("datasets[0].keep_tokens_separator", "datasets[0].secondary_separator", "datasets[0].enable_wildcard",
                "datasets[0].subsets[0].caption_suffix"):  # fmt: skip
        assert key in notes, key
    assert "color_aug" not in notes  # off, as kohya's default


def test_datasets_at_other_resolutions_are_not_merged(tmp_path):
    """The README's multi-resolution examples: one folder at several resolutions (skip_image_resolution for the
    larger ones) is several datasets in kohya; only the first is carried. A dataset with the first one's values
    is merged (kohya would train it at the same sizes)."""
    _folder(tmp_path, "shared", 2)
    _folder(tmp_path, "more", 2)
    config = _write(
        tmp_path / "d.toml",
        """
        [general]
        enable_bucket = true
        bucket_no_upscale = true
        max_bucket_reso = 1536
        [[datasets]]
        resolution = 640
          [[datasets.subsets]]
          image_dir = "shared"
        [[datasets]]
        resolution = 960
        skip_image_resolution = 640
          [[datasets.subsets]]
          image_dir = "shared"
        [[datasets]]
        resolution = 640
          [[datasets.subsets]]
          image_dir = "more"
          num_repeats = 2
        """,
    )
    imported = import_kohya(config)
    dataset = from_dict(imported.settings).dataset
    assert [(Path(s.path).name, s.repeats) for s in dataset.subsets] == [("shared", 1), ("more", 2)]
    assert (dataset.resolution, dataset.max_bucket_side, dataset.bucket_no_upscale) == (640, 1536, True)
    notes = _notes(imported)
    assert "not carried over: datasets[1]: differs from the first dataset in resolution;" in notes
    assert "datasets[1].skip_image_resolution: small images are not skipped here" in notes


def test_validation_split_becomes_a_count_of_training_images(tmp_path):
    _folder(tmp_path, "a", 10)
    _folder(tmp_path, "b", 5)
    _folder(tmp_path, "reg", 30)
    config = _write(
        tmp_path / "d.toml",
        """
        [general]
        validation_split = 0.2
        validation_seed = 9
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "a"
          [[datasets.subsets]]
          image_dir = "b"
          [[datasets.subsets]]
          image_dir = "reg"
          is_reg = true
        """,
    )
    validation = from_dict(import_kohya(config).settings).validation
    assert (validation.images, validation.seed) == (3, 9)  # round(10 x 0.2) + round(5 x 0.2); never the reg images
    missing = _write(
        tmp_path / "m.toml", '[general]\nvalidation_split = 0.5\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'
    )
    assert "validation.images to the number to hold out" in _notes(import_kohya(missing))


def test_prior_loss_weight_comes_from_the_training_config_only(tmp_path):
    """kohya's dataset-config schema has no prior_loss_weight (ARGPARSE_SPECIFIC_SCHEMA): only --prior_loss_weight."""
    _folder(tmp_path, "a", 1)
    config = _write(
        tmp_path / "d.toml", '[general]\nprior_loss_weight = 0.3\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    )
    training = _write(tmp_path / "t.toml", "prior_loss_weight = 0.7\n")
    imported = import_kohya(config, training)
    assert from_dict(imported.settings).dataset.prior_loss_weight == 0.7
    assert "general.prior_loss_weight: kohya reads it only from the training config" in _notes(imported)


def test_sd_scripts_training_config_with_folders(tmp_path):
    """A --config_file TOML (sections are merged, as sd-scripts does): LyCORIS LoCon with dora_wd is DoRA with
    convolutions; N_name folders under train_data_dir are our dataset.path."""
    _folder(tmp_path / "train", "10_ohwx", 10)
    _folder(tmp_path / "train", "2_extra", 5)
    _write(tmp_path / "prompts.txt", "ohwx, a portrait\n")
    training = _write(
        tmp_path / "train.toml",
        """
        [model_arguments]
        pretrained_model_name_or_path = "/models/sdxl.safetensors"
        [network_arguments]
        network_module = "lycoris.kohya"
        network_dim = 32
        network_args = ["algo=locon", "dora_wd=True", "conv_dim=8", "conv_alpha=4", "use_tucker=False"]
        network_train_unet_only = true
        [optimizer_arguments]
        optimizer_type = "bitsandbytes.optim.AdamW8bit"
        optimizer_args = ["weight_decay=0.05", "betas=0.9,0.99", "d_coef=2"]
        learning_rate = 2e-4
        lr_scheduler = "cosine_with_restarts"
        lr_warmup_steps = 100
        loraplus_lr_ratio = 16
        [dataset_arguments]
        train_data_dir = "train"
        reg_data_dir = "/data/reg"
        resolution = "1024,1024"
        caption_extension = ".txt"
        shuffle_caption = true
        keep_tokens = 1
        color_aug = true
        validation_split = 0.2
        [training_arguments]
        max_train_epochs = 12
        max_train_steps = 5000
        train_batch_size = 2
        mixed_precision = "bf16"
        seed = 123
        output_name = "ohwx-dora"
        save_every_n_epochs = 2
        save_precision = "float"
        prior_loss_weight = 0.5
        min_snr_gamma = 5
        multires_noise_iterations = 6
        loss_type = "huber"
        huber_c = 0.2
        huber_schedule = "exponential"
        debiased_estimation_loss = true
        min_timestep = 100
        max_timestep = 900
        ip_noise_gamma = 0.1
        log_with = "wandb"
        log_tracker_name = "characters"
        sample_prompts = "prompts.txt"
        sample_every_n_steps = 200
        validate_every_n_steps = 50
        xformers = true
        lr_scheduler_num_cycles = 1
        my_typo_option = 3
        """,
    )
    imported = import_kohya(training)
    config = from_dict(imported.settings)
    network, optimizer, training_settings = config.network, config.optimizer, config.training
    assert (network.kind, network.rank, network.alpha) == ("dora", 32, 1.0)  # alpha: kohya's default 1
    assert (network.unet_targets, network.conv_rank, network.conv_alpha) == ("attn+conv", 8, 4.0)
    assert network.train_text_encoders is False
    assert (optimizer.name, optimizer.learning_rate, optimizer.weight_decay) == ("adamw8bit", 2e-4, 0.05)
    assert (optimizer.betas, optimizer.scheduler, optimizer.warmup_steps) == ([0.9, 0.99], "cosine_with_restarts", 100)
    assert optimizer.loraplus_ratio == 16.0
    assert (training_settings.epochs, training_settings.max_steps, training_settings.batch_size) == (12, 0, 2)
    assert (training_settings.seed, training_settings.min_snr_gamma) == (123, 5.0)
    assert (config.saving.output_name, config.saving.every_n_epochs, config.saving.save_dtype) == (
        "ohwx-dora",
        2,
        "fp32",
    )
    assert config.dataset.path == str(tmp_path / "train") and config.dataset.regularization_path == "/data/reg"
    assert (config.dataset.caption_extension, config.dataset.shuffle_tags, config.dataset.keep_tokens) == (
        ".txt",
        True,
        1,
    )
    assert config.dataset.prior_loss_weight == 0.5
    assert (config.validation.images, config.validation.every_n_steps) == (3, 50)  # round(10 x .2) + round(5 x .2)
    assert config.sampling.prompt_file == str(tmp_path / "prompts.txt")
    assert (config.sampling.every_n_epochs, config.sampling.every_n_steps) == (0, 200)  # kohya: no epochs given
    notes = _notes(imported)
    for key in ("color_aug", "xformers", "my_typo_option", "optimizer_args d_coef"):
        assert f"{key}:" in notes or f"{key}," in notes, key
    assert training_settings.multires_noise_iterations == 6 and "multires" not in notes  # a recipe option now
    recipe = training_settings
    assert (recipe.loss, recipe.huber_c, recipe.huber_schedule, recipe.debiased_estimation) == (
        "huber",
        0.2,
        "exponential",
        True,
    )
    assert (recipe.min_timestep, recipe.max_timestep, recipe.ip_noise_gamma) == (100, 900, 0.1)
    assert (config.saving.wandb, config.saving.wandb_project) == ("online", "characters")
    assert "max_train_steps: kohya ignores it when max_train_epochs is set" in notes
    assert "network_alpha: not set: kohya scales updates by 1 / dim" in notes
    assert "use_tucker" not in notes and "lr_scheduler_num_cycles" not in notes  # their do-nothing values


def test_kohya_ss_gui_json(tmp_path):
    """A kohya_ss GUI config: LoRA_type and its LyCORIS fields, epoch, max_resolution, the prompts themselves,
    numbers as text, and the GUI's rule that a zero text-encoder rate trains the UNet only."""
    train = _folder(tmp_path, "train/5_cat", 2).parent
    gui = {
        "LoRA_type": "LyCORIS/LoCon", "LyCORIS_preset": "full", "dora_wd": True, "conv_dim": 4, "conv_alpha": 2,
        "network_dim": 16, "network_alpha": 8, "optimizer": "Prodigy",
        "optimizer_args": "weight_decay=0.01 decouple=True", "learning_rate": 1.0, "unet_lr": 1.0,
        "text_encoder_lr": 0.0, "lr_scheduler": "constant", "lr_warmup": 0,
        "epoch": 6, "max_train_epochs": "", "max_resolution": "1024,1024", "enable_bucket": True,
        "train_data_dir": str(train), "reg_data_dir": "", "caption_extension": ".txt", "keep_tokens": "1",
        "seed": "1234", "max_token_length": "75", "sample_prompts": "cat, sitting --w 1024\n\ncat, running --d 3\n",
        "sample_every_n_epochs": 1, "sample_sampler": "euler_a", "sdxl": True, "xformers": "xformers",
        "num_cpu_threads_per_process": 2, "use_tucker": False, "mixed_precision": "bf16", "save_precision": "bf16",
        "output_name": "cat", "multires_noise_iterations": 6, "noise_offset_type": "Original", "noise_offset": 0.05,
    }  # fmt: skip
    imported = import_kohya(_write(tmp_path / "cat.json", json.dumps(gui)))
    config = from_dict(imported.settings)
    assert (config.network.kind, config.network.rank, config.network.alpha) == ("dora", 16, 8.0)
    assert (config.network.conv_rank, config.network.conv_alpha, config.network.train_text_encoders) == (4, 2.0, False)
    assert (config.optimizer.name, config.optimizer.unet_lr, config.optimizer.weight_decay) == ("prodigy", 1.0, 0.01)
    assert (config.training.epochs, config.training.seed, config.training.noise_offset) == (6, 1234, 0.05)
    assert (config.dataset.resolution, config.dataset.keep_tokens, config.dataset.path) == (1024, 1, str(train))
    assert config.sampling.prompts == ["cat, sitting --w 1024", "cat, running --d 3"]
    assert (config.saving.output_name, config.saving.save_dtype) == ("cat", "bf16")
    notes = _notes(imported)
    for key in ("sample_sampler", "num_cpu_threads_per_process", "xformers", "optimizer_args decouple"):
        assert key in notes, key
    assert "multires" not in notes and "max_token_length" not in notes  # Original noise; 75 is kohya's default
    assert config.training.multires_noise_iterations == 0  # the GUI passes it only with noise_offset_type Multires


@pytest.mark.parametrize(
    ("lora_type", "kind", "targets", "note"),
    [
        ("Standard", "lora", "attn", None),  # the GUI passes no conv_dim to plain LoRA
        ("Kohya LoCon", "lora", "attn+conv", None),
        ("LyCORIS/LoHa", "lora", "attn+conv", "LyCORIS algo=loha is not trained here"),
        ("Kohya DyLoRA", "lora", "attn+conv", "networks.dylora is not trained here"),
    ],
)
def test_gui_network_types(tmp_path, lora_type, kind, targets, note):
    gui = {"LoRA_type": lora_type, "conv_dim": 8, "network_dim": 8, "network_alpha": 4, "train_data_dir": str(tmp_path)}
    imported = import_kohya(_write(tmp_path / "g.json", json.dumps(gui)))
    network = from_dict(imported.settings).network
    assert (network.kind, network.unet_targets) == (kind, targets)
    assert note is None or note in _notes(imported)


def test_a_training_config_names_its_dataset_config(tmp_path):
    """kohya_ss passes dataset_config on; kohya then ignores train_data_dir. A resolution below our smallest
    bucket side brings the side down with it."""
    _folder(tmp_path, "images", 2)
    _write(tmp_path / "data.toml", '[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = "images"\n')
    gui = {"LoRA_type": "Standard", "dataset_config": "data.toml", "train_data_dir": "/elsewhere", "network_dim": 4}
    imported = import_kohya(_write(tmp_path / "run.json", json.dumps(gui)))
    dataset = from_dict(imported.settings).dataset
    assert [Path(s.path) for s in dataset.subsets] == [tmp_path / "images"] and not dataset.path
    assert (dataset.resolution, dataset.min_bucket_side) == (256, 256)
    assert "train_data_dir: kohya ignores it when a dataset config is given" in _notes(imported)


def test_import_command_writes_a_preset_that_loads(tmp_path, capsys):
    data = tmp_path / "data"
    _folder(data, "char", 3)
    _folder(data, "reg", 3)
    config = _write(
        data / "dataset.toml",
        """
        [general]
        enable_bucket = true
        caption_extension = ".txt"
        [[datasets]]
        resolution = 1024
          [[datasets.subsets]]
          image_dir = "char"
          num_repeats = 8
          color_aug = true
          [[datasets.subsets]]
          image_dir = "reg"
          is_reg = true
        """,
    )
    training = _write(tmp_path / "train.toml", 'network_module = "networks.lora"\nnetwork_dim = 8\nnetwork_alpha = 8\n')
    out = data / "imported.toml"
    assert main(["import-kohya", str(config), "--training", str(training), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not carried over: datasets[0].subsets[0].color_aug" in printed and f"preset written to {out}" in printed
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# imported from kohya: dataset.toml train.toml\n# not carried over:")
    assert 'path = "char"' in text  # relative to the preset's folder
    config_loaded = load_config(out)
    assert [(Path(s.path), s.repeats, s.role) for s in config_loaded.dataset.subsets] == [
        (data / "char", 8, "train"),
        (data / "reg", 1, "regularization"),
    ]
    assert (config_loaded.network.kind, config_loaded.network.rank) == ("lora", 8)
    assert main(["import-kohya", str(config), "--out", str(out)]) == 2  # never overwrites
    assert f"{out}: already exists" in capsys.readouterr().err
    assert main(["import-kohya", str(config)]) == 0  # without --out: the preset on stdout
    assert tomllib.loads(capsys.readouterr().out)["dataset"]["subsets"][0]["repeats"] == 8


@pytest.mark.parametrize(
    ("name", "text", "where", "fix"),
    [
        ("missing.toml", None, "missing.toml", "file not found"),
        ("broken.toml", "[[datasets]\nimage_dir = 1", "broken.toml", "not valid TOML"),
        ("broken.json", '{"datasets": [', "broken.json", "not valid JSON"),
        ("empty.toml", "[[datasets]]\nresolution = 512\n", "empty.toml: datasets[0]", "has no [[datasets.subsets]]"),
        ("nodir.toml", "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "datasets[0].subsets[0]",
         "image_dir missing"),
        ("badvalue.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = "ten"\n',
         "datasets[0].subsets[0]: num_repeats", "expected a whole number"),
        ("finetune.toml", '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n', "finetune.toml",
         "no subset can be trained here"),
    ],
)  # fmt: skip
def test_bad_input_names_the_file_and_the_option(tmp_path, capsys, name, text, where, fix):
    path = tmp_path / name
    if text is not None:
        _write(path, text)
    with pytest.raises(ConfigError) as raised:
        import_kohya(path)
    assert where in str(raised.value) and fix in str(raised.value)
    assert main(["import-kohya", str(path)]) == 2
    assert fix in capsys.readouterr().err


def test_the_studio_tells_presets_from_kohya_configs(tmp_path):
    assert not is_kohya_config(ROOT / "presets" / "sdxl-character-dora.toml")
    text = '[training]\nmax_train_epochs = 3\ntrain_batch_size = 2\n[dataset]\ntrain_data_dir = "images"\n'
    sd_scripts = _write(tmp_path / "t.toml", text)
    assert is_kohya_config(sd_scripts)  # sections named like ours, with kohya's keys
    assert is_kohya_config(_write(tmp_path / "g.json", "{}"))
    config, notes = load_preset_or_kohya(sd_scripts)
    assert (config.training.epochs, config.training.batch_size) == (3, 2)
    assert config.dataset.path == str(tmp_path / "images")
    assert any(note.startswith("kohya's default: caption_extension") for note in notes)
