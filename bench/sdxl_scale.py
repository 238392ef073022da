"""The whole SDXL UNet (its real config, random weights, nothing downloaded): step time and memory per method.

Our LoRA and DoRA, PEFT's LoRA and DoRA, and our QLoRA / QDoRA over an fp8 and an NF4 base, each on the 722
attention Linears at rank 16, batch 1, AdamW; with and without gradient checkpointing. Each (method,
checkpointing) runs in its own process; one the machine cannot hold is reported as out of memory (the kernel
kills it), not as a crash. Measured: median seconds per step (1 warm-up, then ``--reps``), the process's peak
RSS over the timed steps, and the peak of tensor memory one step allocates (``training.memory.MemoryTracker``:
what ``torch.cuda.max_memory_allocated`` counts on a GPU), with the UNet's own weights and the trainable
state at rest.

    python bench/sdxl_scale.py                       # CPU: 256 px, fp32 (about an hour on 2 cores)
    python bench/sdxl_scale.py --quick               # the tiny UNet, a few seconds a method: checks it runs
    python bench/sdxl_scale.py --device cuda --size 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

METHODS = ("lora", "dora", "peft-lora", "peft-dora", "qlora-fp8", "qdora-fp8", "qlora-nf4", "qdora-nf4")
CHECKPOINTED = ("lora", "dora", "peft-dora", "qdora-fp8", "qdora-nf4")  # also run with gradient checkpointing
RANK, ALPHA, GB = 16, 16.0, 1e9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_unet(quick: bool, device: torch.device, dtype: torch.dtype):
    """SDXL's UNet from its real config (or the tiny one), random weights, seed 0, frozen."""
    from diffusers import UNet2DConditionModel

    from trainer.builtin.tiny import TINY_UNET_CONFIG
    from trainer.sdxl.configs import SDXL_UNET_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG if quick else SDXL_UNET_CONFIG)
    return unet.to(dtype).requires_grad_(False)


def apply(method: str, unet, device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Put the method's adapters on the attention Linears; returns what AdamW trains."""
    from trainer.adapters.injection import NetworkSpec, inject_adapters, target_module_paths
    from trainer.adapters.quantized import quantize_frozen

    targets = target_module_paths(unet, "unet", "attn")
    if method.startswith("peft-"):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                            use_dora=method == "peft-dora")  # fmt: skip
        inject_adapter_in_model(config, unet)
    else:
        if method.startswith("q"):
            quantize_frozen(unet, method.rsplit("-", 1)[1], device, dtype)
        spec = NetworkSpec(dora="dora" in method, rank=RANK, alpha=ALPHA)
        inject_adapters(unet, "unet", spec, "attn")
    return [p for p in unet.parameters() if p.requires_grad]


def child(method: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    from trainer.training.memory import MemoryTracker, storage_bytes

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = build_unet(args.quick, device, dtype)
    params = apply(method, unet, device, dtype)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    config, latent = unet.config, args.size // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    latents = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(1, 77, config.cross_attention_dim, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
             "time_ids": torch.full((1, 6), float(args.size), device=device, dtype=dtype)}  # fmt: skip
    timestep, target = torch.tensor([500], device=device), torch.randn_like(latents)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss = F.mse_loss(unet(latents, timestep, context, added_cond_kwargs=added).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; creates the optimizer state
    sync()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the timed steps only
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    rss_peak = _status_kb("VmHWM") * 1024
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    existing = [*unet.parameters(), *unet.buffers(), *state, latents, context, target, *added.values()]
    quantized = [m.quantized.storage for m in unet.modules() if hasattr(m, "quantized")]
    at_rest = storage_bytes([*existing, *quantized])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        step_peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = MemoryTracker(existing)
        with tracker:
            step()
        step_peak = tracker.peak
    return {
        "method": method,
        "checkpointing": checkpointing,
        "seconds": statistics.median(times),
        "rss_peak_gb": rss_peak / GB,
        "allocated_peak_gb": (at_rest + step_peak) / GB,
        "weights_and_state_gb": at_rest / GB,
        "trainable_params": sum(p.numel() for p in params),
    }


def _status_kb(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1])


def run(method: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    """One method in a fresh process; the kernel killing it for memory is reported, not raised."""
    command = [sys.executable, __file__, "--child", method, *(["--checkpointing"] if checkpointing else [])]
    command += ["--device", args.device, "--size", str(args.size), "--dtype", args.dtype, "--reps", str(args.reps)]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode == -signal.SIGKILL:
        return {"method": method, "checkpointing": checkpointing, "error": "out of memory (killed by the kernel)"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "checkpointing": checkpointing, "error": tail[0][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels (latents are 1/8)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="the tiny UNet: checks that every method runs")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        print(json.dumps(child(args.child, args.checkpointing, args)))
        return
    methods = args.methods.split(",")
    plan = [(m, False) for m in methods] + [(m, True) for m in methods if m in CHECKPOINTED]
    rows = []
    for method, checkpointing in plan:
        rows.append(run(method, checkpointing, args))
        print(json.dumps(rows[-1]), flush=True)
    _table(rows, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


def _table(rows: list[dict], args: argparse.Namespace) -> None:
    """Ratios against our LoRA with the same checkpointing, and the one JSON summary line."""
    lora = {row["checkpointing"]: row for row in rows if row["method"] == "lora" and "error" not in row}
    model = "tiny UNet" if args.quick else "SDXL UNet"
    print(f"\n{model}, {args.size} px, {args.dtype}, {args.device}, batch 1, rank {RANK}")
    print(f"{'method':<12}{'ckpt':>5}{'s/step':>9}{'x lora':>8}{'alloc GB':>10}{'x lora':>8}{'RSS GB':>8}")
    summary = {}
    for row in rows:
        ckpt = "yes" if row["checkpointing"] else "no"
        if "error" in row:
            print(f"{row['method']:<12}{ckpt:>5}  {row['error']}")
            summary[f"{row['method']}{'-ckpt' if row['checkpointing'] else ''}"] = row["error"]
            continue
        ref = lora.get(row["checkpointing"])
        time_ratio = row["seconds"] / ref["seconds"] if ref else None
        memory_ratio = row["allocated_peak_gb"] / ref["allocated_peak_gb"] if ref else None
        print(f"{row['method']:<12}{ckpt:>5}{row['seconds']:>9.2f}{time_ratio or 0:>8.2f}"
              f"{row['allocated_peak_gb']:>10.2f}{memory_ratio or 0:>8.2f}{row['rss_peak_gb']:>8.2f}")  # fmt: skip
        key = f"{row['method']}{'-ckpt' if row['checkpointing'] else ''}"
        summary[key] = {"s": round(row["seconds"], 3), "x_lora": time_ratio and round(time_ratio, 3),
                        "alloc_gb": round(row["allocated_peak_gb"], 3)}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
