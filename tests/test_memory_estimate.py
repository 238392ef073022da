"""The memory estimate against memory really allocated on the CPU, as PyTorch's profiler records it.

The profiler's memory timeline is independent of the estimate: it replays every allocation and free the
CPU allocator made. The estimate counts a step on fake tensors; these tests run the real thing.
"""

from __future__ import annotations

import functools
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from trainer.adapters.injection import make_adapter
from trainer.adapters.layers import AdapterSpec
from trainer.cli import main
from trainer.config.parsing import from_dict
from trainer.runs.run_directory import RunDirectory
from trainer.training import loop
from trainer.training.estimate import GB, estimate_run
from trainer.training.memory import MemoryTracker, storage_bytes
from trainer.training.simulated_run import SimulatedRun, model_tensors

TOLERANCE = 0.10  # the bar: within 10% of what is measured


def _timeline_peak(prof) -> tuple[int, int]:
    """(peak, first) total bytes of the CPU allocations the profiler saw, tensors from before it included."""
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return max(totals), totals[0]


def _profiled(fn) -> tuple[int, int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    return _timeline_peak(prof)


def _dora_step(unet, inputs):
    """Forward, backward and an AdamW step of a DoRA-adapted UNet (or block)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for param in params:  # the state every step after the first holds
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def step():
        out = unet(*inputs[0], **inputs[1])
        out = out.sample if hasattr(out, "sample") else out[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return step, [*unet.parameters(), *unet.buffers(), *state]


def _sdxl_block() -> torch.nn.Module:
    """SDXL's second down block (640 channels, two 2-deep transformers, cross-attention from 2048), real widths."""
    return CrossAttnDownBlock2D(
        in_channels=320,
        out_channels=640,
        temb_channels=1280,
        num_layers=2,
        transformer_layers_per_block=2,
        num_attention_heads=10,
        cross_attention_dim=2048,
        resnet_groups=32,
        add_downsample=True,
        use_linear_projection=True,
    )


def _block_step(checkpointing: bool):
    block = _sdxl_block().requires_grad_(False)
    block.gradient_checkpointing = checkpointing  # what diffusers' enable_gradient_checkpointing sets
    block._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    linears = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    for path in [name for name in linears if name.startswith("attentions.")]:  # as the attention targets do
        parent, _, child = path.rpartition(".")
        owner = block.get_submodule(parent)
        setattr(owner, child, make_adapter(getattr(owner, child), AdapterSpec(rank=16, alpha=16, dora=True)))
    block.train()
    hidden = torch.randn(1, 320, 32, 32, requires_grad=False)
    args = (hidden, torch.randn(1, 1280))
    return _dora_step(block, (args, {"encoder_hidden_states": torch.randn(1, 77, 2048)}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tracker_counts_a_real_sdxl_block_step_as_the_allocator_does_on_real_and_fake_tensors(checkpointing):
    """SDXL's own block types (GEGLU, SDPA at SDXL's head size, group norms) with DoRA: the tracker on real
    tensors and on fake ones, against the CPU allocator's record of the real step."""
    torch.manual_seed(1)
    step, existing = _block_step(checkpointing)
    real_peak, real_first = _profiled(step)
    tracker = MemoryTracker(existing)
    with tracker:
        step()
    assert tracker.peak == pytest.approx(real_peak - real_first, rel=0.02)
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")
        fake_step, existing = _block_step(checkpointing)
        tracker = MemoryTracker(existing)
        with tracker:
            fake_step()
    assert tracker.peak == pytest.approx(real_peak - real_first, rel=TOLERANCE)


@pytest.fixture(scope="module")
def one_bucket_dataset(tmp_path_factory):
    """Four 64x64 pictures: every step is at the largest (the only) bucket."""
    root = tmp_path_factory.mktemp("one-bucket") / "2_square"
    root.mkdir()
    for index in range(4):
        Image.new("RGB", (64, 64), (60 * index, 90, 200)).save(root / f"{index}.png")
        (root / f"{index}.txt").write_text(f"a square {index}")
    return root.parent


def _settings(tiny_dir, dataset, cache, **network) -> dict:
    return {
        "model": {"path": str(tiny_dir)},
        "dataset": {
            "path": str(dataset),
            "resolution": 64,
            "min_bucket_side": 64,
            "max_bucket_side": 64,
            "latent_cache_dir": str(cache),
            "loader_workers": 0,
        },  # fmt: skip
        "network": {"kind": "dora", "rank": 4, "alpha": 4.0, **network},
        "training": {"epochs": 1, "batch_size": 2, "mixed_precision": "no", "seed": 3},
        "sampling": {"prompts": []},
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"network": {"unet_targets": "attn+conv", "train_text_encoders": True}},
        {"model": {"base_precision": "nf4"}, "training": {"gradient_checkpointing": True}},
        {"optimizer": {"name": "adamw8bit"}},  # bitsandbytes' state, which the estimate makes without its kernels
    ],
    ids=["conv-and-text-encoders", "nf4-checkpointing", "adamw8bit"],
)
def test_the_estimate_is_within_ten_percent_of_a_real_training_step(
    tiny_dir, one_bucket_dataset, tmp_path, monkeypatch, changes
):
    """The trainer's own second step (the optimizer state there), counted on real tensors, against the estimate.

    What is on the device in a GPU run is counted: the UNet and adapters, the optimizer state, and the text
    encoders when they run every step; the tracker counts what the step allocates beyond that.
    """
    data = _settings(tiny_dir, one_bucket_dataset, tmp_path / "cache")
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    config = from_dict(data)
    real_loss, real_after_step = loop.training_loss, loop.Trainer._after_step
    measured = {}

    def training_loss(session, *args, **kwargs):
        if session.optimizer.state and "tracker" not in measured:  # the second step: the state is there
            models = [session.pipe.unet]
            if session.text_cache is None:
                models += [session.pipe.text_encoder, session.pipe.text_encoder_2]
            state = [v for s in session.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            resident = [*model_tensors(models), *state]
            measured["resident"], measured["state"] = storage_bytes(resident), storage_bytes(state)
            measured["tracker"] = MemoryTracker(resident)
            measured["tracker"].__enter__()
        return real_loss(session, *args, **kwargs)

    def after_step(self, *args):
        if "tracker" in measured and "peak" not in measured:
            measured["tracker"].__exit__(None, None, None)
            measured["peak"] = measured["resident"] + measured["tracker"].peak
        return real_after_step(self, *args)

    monkeypatch.setattr(loop, "training_loss", training_loss)
    monkeypatch.setattr(loop.Trainer, "_after_step", after_step)
    loop.Trainer(config, RunDirectory(tmp_path / "run"), show_progress=False).run_training()
    estimate = estimate_run(config, fused_optimizer=False)  # on the CPU AdamW loops over tensors (foreach)
    assert estimate.training_peak == pytest.approx(measured["peak"], rel=TOLERANCE)
    # The same state tensors, counted; 0.5% because the estimate gives every adapter its state, and AdamW makes
    # none for those that never get a gradient (the text encoders' last layers: SDXL reads the penultimate one).
    assert estimate.optimizer_state == pytest.approx(measured["state"], rel=0.005)


def test_estimate_command_prints_the_items_and_says_when_a_run_will_not_fit(tiny_dir, capsys):
    code = main(["estimate", "presets/quickstart.toml", "--set", f"model.path={tiny_dir}", "--set",
                 "model.prediction_type=epsilon", "--set", "model.zero_terminal_snr=false", "--json",
                 "--device-memory", "0.01"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["peak_gb"] == max(report["training_peak_gb"], report["sampling_peak_gb"])
    assert report["fits"] is False and report["device_memory_gb"] == 0.01
    assert any("gradient_checkpointing" in tip for tip in report["advice"])
    assert report["offloaded"] == ["vae", "text_encoder", "text_encoder_2"]
    assert 0 < report["training_peak_gb"] * GB < 1e9


def test_the_estimate_counts_the_moving_average_as_a_float32_copy_of_the_adapter():
    params = {"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5)}
    run = SimpleNamespace(trainable=params, config=from_dict({"dataset": {"path": "d"}}))
    assert SimulatedRun._ema_bytes(run) == 0
    run.config.training.ema_decay = 0.999
    assert SimulatedRun._ema_bytes(run) == (12 + 5) * 4
