"""Where a run's models live: what is offloaded once its outputs are cached, and what sampling brings back when."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from torch import nn

from app.estimate import estimate, format_markdown
from trainer.config.parsing import from_dict
from trainer.training.placement import OFFLOAD_DEVICE, offload_cached, on_device

GPU = torch.device("cuda")  # never used for arithmetic here: the modules below only record where they are sent


class Recording(nn.Linear):
    """A layer that records every move instead of making it, and where it was when it ran."""

    def __init__(self, log: list, name: str) -> None:
        super().__init__(2, 2)
        self.log, self.name, self.at = log, name, "cpu"

    def to(self, device, *args, **kwargs):
        self.at = torch.device(device).type
        self.log.append((self.name, self.at))
        return self

    def forward(self, x):
        self.log.append((self.name, f"runs on {self.at}"))
        return x


def _pipe(log: list) -> SimpleNamespace:
    return SimpleNamespace(**{name: Recording(log, name) for name in ("vae", "text_encoder", "text_encoder_2")})


def test_cached_outputs_send_their_models_to_cpu_memory_on_a_gpu_run_only():
    log = []
    pipe = _pipe(log)
    assert offload_cached(pipe, latents_cached=True, captions_cached=True, device=torch.device("cpu")) == ()
    assert log == []  # a CPU run has nowhere else to put them
    parked = offload_cached(pipe, latents_cached=True, captions_cached=False, device=GPU)
    assert parked == ("vae",) and log == [("vae", OFFLOAD_DEVICE.type)]


def test_sampling_brings_the_vae_back_and_each_text_encoder_only_for_its_own_forward():
    log = []
    pipe = _pipe(log)
    with on_device(pipe, ("vae", "text_encoder", "text_encoder_2"), GPU):
        pipe.text_encoder(torch.zeros(1))
        pipe.text_encoder_2(torch.zeros(1))
        pipe.vae(torch.zeros(1))
    assert log == [
        ("vae", "cuda"),
        ("text_encoder", "cuda"), ("text_encoder", "runs on cuda"), ("text_encoder", "cpu"),
        ("text_encoder_2", "cuda"), ("text_encoder_2", "runs on cuda"), ("text_encoder_2", "cpu"),
        ("vae", "runs on cuda"),
        ("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu"),
    ]  # fmt: skip
    pipe.text_encoder(torch.zeros(1))  # the hooks are gone after sampling
    assert log[-1] == ("text_encoder", "runs on cpu")


# --- the studio's estimate -----------------------------------------------------------------------------------

RESULT = {
    "bucket": [1024, 1024],
    "batch_size": 1,
    "base_weights_gb": {"unet": 1.33},
    "adapter_gb": 0.09,
    "gradients_gb": 0.09,
    "optimizer_state_gb": 0.02,
    "activations_gb": 0.57,
    "training_peak_gb": 2.1,
    "sampling_peak_gb": 4.99,
    "peak_gb": 4.99,
    "offloaded": ["vae", "text_encoder", "text_encoder_2"],
    "notes": [],
    "device_memory_gb": 4.0,
    "fits": False,
    "advice": ['model.base_precision = "nf4": ...', "training.gradient_checkpointing = true: ..."],
}


def test_the_configure_tab_shows_the_items_the_peak_and_what_to_change():
    text = format_markdown(RESULT)
    assert "| unet weights | 1.33 GB |" in text and "**4.99 GB**" in text and "4.0 GB" in text
    assert "will not fit" in text and "- training.gradient_checkpointing = true: ..." in text
    assert "will not fit" not in format_markdown({**RESULT, "fits": True})
    assert "no GPU here" in format_markdown({**RESULT, "device_memory_gb": None})
    assert format_markdown({"error": "boom"}) == "**Could not estimate memory:** boom"
    # the peak plus 0.5 GB for CUDA itself against each card's GiB: 4.99 GB fits 8 GiB (8.59 GB), 8.2 GB does not
    assert "Fits on: 8 GB ✓ · 12 GB ✓ · 16 GB ✓ · 24 GB ✓" in text
    assert "Fits on: 8 GB ✗ · 12 GB ✓" in format_markdown({**RESULT, "peak_gb": 8.2})


def test_the_studio_runs_the_estimate_once_per_settings(tmp_path, monkeypatch):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return SimpleNamespace(stdout=json.dumps(RESULT), stderr="", returncode=0)

    monkeypatch.setattr("app.estimate.subprocess.run", run)
    config = from_dict({"dataset": {"path": str(tmp_path)}})
    expected = {**RESULT, "from_sdxl_configs": False}
    assert estimate(config, tmp_path) == expected
    assert estimate(config, tmp_path) == expected  # the same form again: from the cache
    assert len(calls) == 1 and calls[0][2:4] == ["trainer.cli", "estimate"] and calls[0][-1] == "--json"
    changed = from_dict({"dataset": {"path": str(tmp_path)}, "network": {"rank": 8}})
    estimate(changed, tmp_path)
    assert len(calls) == 2 and "--architecture" not in calls[1]  # the model is here: read its own configs
    not_downloaded = from_dict(
        {"dataset": {"path": str(tmp_path)}, "model": {"path": str(tmp_path / "sdxl.safetensors")}}
    )
    result = estimate(not_downloaded, tmp_path)
    assert calls[2][-3:] == ["--architecture", "sdxl", "--json"]
    assert "estimated from SDXL's own configs" in format_markdown(result)
