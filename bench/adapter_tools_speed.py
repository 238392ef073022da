"""How long ``dora-studio resize`` and ``convert --to lora`` take on an SDXL-sized adapter: 722 layers with the
shapes of SDXL's attention Linears (from its config), rank 32, random fp16 factors and DoRA magnitudes over
random base weights.

Resize (a fixed cut to rank 16, and kohya's ``sv_fro`` rule at 0.9) needs no SVD of a weight-sized matrix
(``adapters.low_rank``: two thin QRs of the factors and one 32 x 32 SVD per layer), so there is nothing a
randomized SVD would save. DoRA -> LoRA does need one of the merged change W' - W per layer: exact up to 2,048 on
the smaller side, randomized above (``kohya.convert``).

    python bench/adapter_tools_speed.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.adapters.weights import AdapterWeights
from trainer.kohya.convert import dora_to_lora
from trainer.kohya.resize import resize_adapters

# (out, in) of SDXL's 722 attention-target Linears and how many of each (proj_in/out, q/k/v/out, ff), counted
# from trainer.adapters.injection.target_module_paths on SDXL_UNET_CONFIG.
SDXL_ATTENTION_SHAPES = {
    (640, 640): 70, (640, 2048): 20, (5120, 640): 10, (640, 2560): 10,
    (1280, 1280): 372, (1280, 2048): 120, (10240, 1280): 60, (1280, 5120): 60,
}  # fmt: skip
RANK = 32


def main() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    generator = torch.Generator().manual_seed(0)
    shapes = [shape for shape, count in SDXL_ATTENTION_SHAPES.items() for _ in range(count)]
    adapters = {
        f"layer{i}": AdapterWeights(
            down=torch.randn(RANK, fan_in, generator=generator).half(),
            up=torch.randn(out, RANK, generator=generator).half(),
            alpha=RANK / 2,
            dora_scale=torch.rand(1, fan_in, generator=generator) + 0.5,
        )
        for i, (out, fan_in) in enumerate(shapes)
    }
    print(f"{len(adapters)} layers, rank {RANK}, {torch.get_num_threads()} threads")
    for label, args in (
        ("--rank 16", (16,)),
        ("--rank 32 --dynamic sv_fro --dynamic-param 0.9", (RANK, "sv_fro", 0.9)),
    ):
        start = time.perf_counter()
        resized = resize_adapters(adapters, *args)
        print(f"resize {label}: {time.perf_counter() - start:.1f} s; new ranks {resized.summary()['ranks']}")
    start, errors = time.perf_counter(), []
    for weights in adapters.values():
        base = torch.randn(weights.up.shape[0], weights.down.shape[1], generator=generator) * 0.02
        errors.append(dora_to_lora(weights, base, RANK)[1])
    print(f"convert --to lora --rank {RANK}: {time.perf_counter() - start:.1f} s (random base weights drawn in it); "
          f"change approximated to {min(errors):.3f}-{max(errors):.3f} relative error")  # fmt: skip


if __name__ == "__main__":
    main()
