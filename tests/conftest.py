"""Test-wide settings: offline, no analytics, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

torch.manual_seed(0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The built-in tiny SDXL-structured model, written once per test session (folder + single file)."""
    from trainer.builtin.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_adapter_file(tiny_dir):
    """Writes an adapter file over a few of the tiny model's UNet layers (six self-attention Linears and one
    conv), random factors of ``rank``, DoRA (input axis) or LoRA; returns its layers as written."""
    from trainer.adapters.weights import AdapterWeights
    from trainer.kohya.adapter_file import save_adapter
    from trainer.kohya.merge import model_stem_targets, pipeline_parts
    from trainer.sdxl.model_files import load_sdxl_pipeline

    targets = model_stem_targets(pipeline_parts(load_sdxl_pipeline(tiny_dir)))
    stems = [s for s in targets if s.startswith("lora_unet") and "attn1_to_" in s][:6]
    stems.append(next(s for s in targets if s.startswith("lora_unet") and targets[s].module.weight.dim() == 4))

    def write(path, rank: int = 8, dora: bool = True, dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(3)
        adapters = {}
        for stem in stems:
            weight = targets[stem].module.weight
            out, inner, conv = weight.shape[0], weight.shape[1:], [1, 1] if weight.dim() == 4 else []
            adapters[stem] = AdapterWeights(
                down=torch.randn(rank, *inner, generator=generator) * 0.1,
                up=torch.randn(out, rank, *conv, generator=generator) * 0.1,
                alpha=4.0,
                dora_scale=(torch.rand(1, inner[0], *conv, generator=generator) + 0.5) if dora else None,
            )
        save_adapter(path, adapters, {"ss_network_dim": str(rank), "ss_network_alpha": "4.0"}, dtype)
        return adapters

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Two threads spin-waiting on a busy two-core machine make tiny convolutions ~10x slower; a module that
    runs many of them asks for one thread with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
