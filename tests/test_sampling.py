"""Sample prompts in kohya's syntax, and sampling with the adapter merged exactly and always unmerged."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.adapters.injection import NetworkSpec, inject_adapters, select_targets
from trainer.adapters.weights import merged_weight
from trainer.errors import PromptSyntaxError
from trainer.sdxl.model_files import load_sdxl_pipeline
from trainer.training.sample_prompts import SamplePrompt, parse_prompt_line, read_prompt_file
from trainer.training.sampling import SampleDefaults, generate_samples, resolve

# -- the prompt syntax -------------------------------------------------------------------------------

KOHYA_EXAMPLES = [  # from sd-scripts' docs (train_network README), verbatim
    (
        (
            "masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background "
            "--n low quality, worst quality, bad anatomy,bad composition, poor, low effort --w 768 --h 768 --d 1 "
            "--l 7.5 --s 28"
        ),
        SamplePrompt(
            "masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background",
            "low quality, worst quality, bad anatomy,bad composition, poor, low effort",
            768,
            768,
            28,
            7.5,
            1,
        ),
    ),
    (
        (
            "masterpiece, best quality, 1boy, in business suit, standing at street, looking back "
            "--n (low quality, worst quality), bad anatomy,bad composition, poor, low effort --w 576 --h 832 --d 2 "
            "--l 5.5 --s 40"
        ),
        SamplePrompt(
            "masterpiece, best quality, 1boy, in business suit, standing at street, looking back",
            "(low quality, worst quality), bad anatomy,bad composition, poor, low effort",
            576,
            832,
            40,
            5.5,
            2,
        ),
    ),
]


def test_every_option():
    parsed = parse_prompt_line("a cat on a sofa --n blurry, lowres --w 1024 --h 768 --s 28 --l 7.5 --d 42")
    assert parsed == SamplePrompt("a cat on a sofa", "blurry, lowres", 1024, 768, 28, 7.5, 42)


def test_options_in_any_order_and_any_case():
    options = ["--n ugly, dark  room", "--w 64", "--h 128", "--s 3", "--l 0", "--d 0"]
    expected = SamplePrompt("a dog", "ugly, dark  room", 64, 128, 3, 0.0, 0)
    for order in itertools.permutations(options):
        assert parse_prompt_line("a dog " + " ".join(order)) == expected
    assert parse_prompt_line("a dog --W 64 --N ugly, dark  room --H 128 --S 3 --L 0 --D 0") == expected


def test_prompt_without_options_and_kohya_examples():
    assert parse_prompt_line("  a cat,--sitting on a mat--w 5  ") == SamplePrompt("a cat,--sitting on a mat--w 5")
    assert parse_prompt_line("a cat --l 3") == SamplePrompt("a cat", guidance_scale=3.0)
    for line, expected in KOHYA_EXAMPLES:
        assert parse_prompt_line(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --w 1001", "multiple of 8, got 1001; use --w 1000"),
        ("a cat --h 0", "multiple of 8"),
        ("a cat --w 512px", "whole number"),
        ("a cat --s 0", "between 1 and 1000"),
        ("a cat --s 1001", "between 1 and 1000"),
        ("a cat --l -1", "number >= 0"),
        ("a cat --l nan", "number >= 0"),
        ("a cat --d -5", "between 0 and 2**64-1"),
        ("a cat --d 1,2", "whole number"),
        ("a cat --ss euler_a", "--ss (sampler) is a kohya option this trainer does not support"),
        ("a cat --g 3.5", "does not support"),
        ("a cat --xyz 3", "unknown option --xyz"),
        ("a cat --w", "--w (width) needs a value"),
        ("a cat --w 64 --w 64", "given twice"),
        ("--w 64 --h 64", "no prompt text"),
        ("a cat --", "must be followed by an option name"),
        ("a cat -- on a mat", "the prompt itself cannot contain ' --'"),
    ],
)
def test_bad_lines_name_the_problem_and_the_line(line, message):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt_line(line)
    assert message in str(caught.value)
    assert repr(line.strip()) in str(caught.value)


def test_unsupported_option_lists_the_supported_ones():
    with pytest.raises(PromptSyntaxError, match=r"Supported: --n \(negative prompt\), --w \(width\)"):
        parse_prompt_line("a cat --cn control.png")


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    text = "# a comment\n\na cat --d 1\n   # indented comment\n\t\na dog --n blurry, lowres\r\n"
    path.write_bytes("\ufeff".encode() + text.encode("utf-8"))  # the BOM Windows editors write
    assert read_prompt_file(path) == [SamplePrompt("a cat", seed=1), SamplePrompt("a dog", "blurry, lowres")]


def test_prompt_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\na dog --w 99\n", encoding="utf-8")
    with pytest.raises(PromptSyntaxError, match=rf"^{path}:4: .*use --w 96 .*'a dog --w 99'"):
        read_prompt_file(path)
    toml = tmp_path / "prompts.toml"
    toml.write_text("[prompt]\n", encoding="utf-8")
    with pytest.raises(PromptSyntaxError, match="one prompt per line"):
        read_prompt_file(toml)


def test_resolve_fills_defaults_and_offsets_the_seed():
    defaults = SampleDefaults(width=64, height=64, steps=2, guidance_scale=5.0, seed=10)
    assert resolve(SamplePrompt("a"), 3, defaults) == {
        "prompt": "a",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 5.0,
        "seed": 13,
    }
    given = resolve(SamplePrompt("b", "c", 128, 96, 4, 0.0, 0), 3, defaults)
    assert (given["width"], given["height"], given["steps"], given["guidance_scale"], given["seed"]) == (
        128,
        96,
        4,
        0.0,
        0,
    )


# -- sampling on the tiny model ----------------------------------------------------------------------

DEFAULTS = SampleDefaults(width=64, height=64, steps=2, guidance_scale=5.0, seed=3)
PROMPTS = [parse_prompt_line("a red cube --n blurry, dark --l 7 --d 11"), SamplePrompt("a blue sphere")]


@pytest.fixture(scope="module")
def adapted(tiny_dir):
    """The tiny pipeline in training mode with a DoRA adapter in the UNet that changes its output.

    Shared by the tests below (loading is most of their time): each leaves it as it found it, which is
    what generate_samples promises and what the restore tests check.
    """
    pipe = load_sdxl_pipeline(tiny_dir)
    adapters = inject_adapters(pipe.unet, "unet", NetworkSpec(dora=True, rank=4, alpha=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=generator) * 0.3)
    pipe.unet.train()
    return pipe, adapters


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _snapshot(pipe):
    weights = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    modes = {name: module.training for name, module in pipe.unet.named_modules()}
    return weights, modes


def _assert_restored(pipe, adapters, before):
    weights, modes = before
    after = pipe.unet.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in weights.items())
    assert not any(layer.merged for layer in adapters.values())
    assert {name: module.training for name, module in pipe.unet.named_modules()} == modes


def test_writes_images_and_resolved_prompts(adapted, tmp_path):
    pipe, adapters = adapted
    paths = generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path / "e1")
    assert [p.name for p in paths] == ["00.png", "01.png"]
    assert sorted(p.name for p in (tmp_path / "e1").iterdir()) == ["00.png", "01.png", "prompts.json"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    records = json.loads((tmp_path / "e1" / "prompts.json").read_text(encoding="utf-8"))
    assert records == [
        {
            "file": "00.png",
            "prompt": "a red cube",
            "negative_prompt": "blurry, dark",
            "width": 64,
            "height": 64,
            "steps": 2,
            "guidance_scale": 7.0,
            "seed": 11,
        },
        {
            "file": "01.png",
            "prompt": "a blue sphere",
            "negative_prompt": "",
            "width": 64,
            "height": 64,
            "steps": 2,
            "guidance_scale": 5.0,
            "seed": 4,
        },
    ]


def test_same_seed_same_pixels_across_epochs(adapted, tmp_path):
    pipe, adapters = adapted
    first = generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path / "e1")
    torch.manual_seed(1234)  # the global RNG must not matter
    second = generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path / "e2")
    for a, b in zip(first, second):
        assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))


def test_merged_and_in_eval_while_sampling_then_restored(adapted, tmp_path):
    pipe, adapters = adapted
    pipe.unet.conv_in.eval()  # a module the trainer keeps in eval must come back in eval
    before = _snapshot(pipe)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: seen.append((all(layer.merged for layer in adapters.values()), module.training))
    )
    try:
        generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path)
    finally:
        hook.remove()
    assert seen and all(merged and not training for merged, training in seen)
    _assert_restored(pipe, adapters, before)
    assert pipe.unet.training and not pipe.unet.conv_in.training
    pipe.unet.conv_in.train()


def test_unmerged_and_restored_when_generation_fails(adapted, tmp_path):
    pipe, adapters = adapted
    before = _snapshot(pipe)
    calls = []

    def fail_in_second_prompt(module, args):
        calls.append(1)
        if len(calls) > DEFAULTS.steps:  # one UNet call per step (CFG is batched): this is prompt 2
            raise RuntimeError("out of memory")

    hook = pipe.unet.register_forward_pre_hook(fail_in_second_prompt)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path)
    finally:
        hook.remove()
    _assert_restored(pipe, adapters, before)
    assert (tmp_path / "00.png").is_file() and not (tmp_path / "prompts.json").exists()


def test_merged_sample_matches_an_independently_merged_model(adapted, tiny_dir, tmp_path):
    """The reference pipeline never saw an adapter layer: its weights are W' from the file-format merge."""
    pipe, adapters = adapted
    reference = load_sdxl_pipeline(tiny_dir)
    targets = select_targets(reference.unet, "unet")
    assert targets.keys() == adapters.keys()
    with torch.no_grad():
        for stem, layer in adapters.items():
            module = reference.unet.get_submodule(targets[stem])
            assert torch.equal(module.weight, layer.base.weight)
            module.weight.copy_(merged_weight(layer.base.weight, layer.to_weights(), 1.0))
    ours = generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path / "ours")
    theirs = generate_samples(reference, {}, PROMPTS, DEFAULTS, tmp_path / "reference")
    for a, b in zip(ours, theirs):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_base_model_sample_differs_from_adapter_sample(adapted, tiny_dir, tmp_path):
    pipe, adapters = adapted
    with_adapter = generate_samples(pipe, adapters, PROMPTS, DEFAULTS, tmp_path / "adapter")
    base = generate_samples(load_sdxl_pipeline(tiny_dir), {}, PROMPTS, DEFAULTS, tmp_path / "base")
    for a, b in zip(with_adapter, base):
        assert np.abs(_pixels(a) - _pixels(b)).max() > 8
