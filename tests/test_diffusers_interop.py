"""Our kohya LoRA file loaded by diffusers' own loader gives the model our layers computed."""

from __future__ import annotations

import torch
from test_cli import unet_inputs

from trainer.adapters.injection import NetworkSpec, adapter_weights, inject_adapters
from trainer.kohya.adapter_file import save_adapter
from trainer.sdxl.model_files import load_sdxl_pipeline


def test_diffusers_load_lora_weights_reads_our_file_exactly(tiny_dir, tmp_path):
    pipe = load_sdxl_pipeline(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    network = NetworkSpec(dora=False, rank=4, alpha=2)
    adapters = inject_adapters(pipe.unet, "unet", network)
    adapters |= inject_adapters(pipe.text_encoder, "te1", network)
    adapters |= inject_adapters(pipe.text_encoder_2, "te2", network)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_up.copy_(torch.randn(layer.lora_up.shape, generator=generator) * 0.05)
        inputs = unet_inputs(pipe, torch.Generator().manual_seed(1))
        ours = pipe.unet(**inputs).sample
    path = tmp_path / "lora.safetensors"
    save_adapter(path, adapter_weights(adapters), {}, dtype=torch.float32)

    fresh = load_sdxl_pipeline(tiny_dir)
    with torch.no_grad():
        base = fresh.unet(**inputs).sample
    fresh.load_lora_weights(str(path))
    # Nothing dropped: every stem became a PEFT LoRA layer in the right model.
    loaded = {
        name: sum(hasattr(m, "lora_A") for m in model.modules())
        for name, model in (("unet", fresh.unet), ("te1", fresh.text_encoder), ("te2", fresh.text_encoder_2))
    }
    assert loaded == {"unet": 722, "te1": 72, "te2": 192}
    with torch.no_grad():
        theirs = fresh.unet(**inputs).sample
    scale = ours.abs().max()
    assert ((base - ours).abs().max() / scale).item() > 1e-3  # the adapter does change the output
    assert ((theirs - ours).abs().max() / scale).item() < 1e-6
