"""The whole SDXL UNet (its real config, random weights, nothing downloaded): step time and memory per method.

Our LoRA and DoRA (both axes), PEFT's LoRA and DoRA, LyCORIS's DoRA, and our QLoRA / QDoRA over an fp8 and an
NF4 base, each on the 722 attention Linears at rank 16, batch 1, AdamW (built as a training run builds it); and VeRA
(ours and PEFT's) and our DVoRA at VeRA's usual rank, 256 (``vera``, ``dvora``, ``peft-vera``).

Two ways to run:
* one process per (method, checkpointing), for memory: one the machine cannot hold is reported as out of
  memory (the kernel kills it), not as a crash. Measured: median seconds per step (1 warm-up, then
  ``--reps``), the process's peak RSS over the timed steps, and the peak of tensor memory one step allocates
  (``training.memory.MemoryTracker``: what ``torch.cuda.max_memory_allocated`` counts on a GPU), with the
  UNet's own weights and the trainable state at rest.
* ``--paired``, for time ratios: the methods in one process, each on its own copy of one frozen UNet (the
  copies share its weights), one step each in turn. On a shared machine a slow minute then slows every
  method alike; the ratio is the median over rounds of each round's ratio.

    python bench/sdxl_scale.py                       # CPU: 256 px, fp32 (about an hour on 2 cores)
    python bench/sdxl_scale.py --paired --methods lora,dora,dora-output --reps 8
    python bench/sdxl_scale.py --quick               # the tiny UNet, a few seconds a method: checks it runs
    python bench/sdxl_scale.py --device cuda --size 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
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

from bench.third_party import apply_lycoris_dora, apply_peft, apply_peft_vera, training_adamw

METHODS = ("lora", "dora", "dora-output", "peft-lora", "peft-dora", "lycoris-dora", "qlora-fp8", "qdora-fp8",
           "qlora-nf4", "qdora-nf4", "vera", "dvora", "peft-vera")  # fmt: skip
CHECKPOINTED = ("lora", "dora", "peft-dora", "qdora-fp8", "qdora-nf4")  # also run with gradient checkpointing
RANK, ALPHA, GB = 16, 16.0, 1e9
VERA_RANK = 256  # VeRA's and DVoRA's: its factors are shared, so its ranks are LoRA's times 16 and more
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
    if method == "peft-vera":
        apply_peft_vera(unet, targets, VERA_RANK)
    elif method.startswith("peft-"):
        apply_peft(unet, targets, RANK, ALPHA, dora=method == "peft-dora")
    elif method == "lycoris-dora":
        network = apply_lycoris_dora(unet, targets, RANK, ALPHA).to(device, dtype)
        unet.lycoris_network = network  # a submodule from here on, so it lives as long as the UNet
        return list(network.parameters())
    else:
        if method.startswith("q"):
            quantize_frozen(unet, method.rsplit("-", 1)[1], device, dtype)
        axis = "output" if method == "dora-output" else "input"
        vera = method in ("vera", "dvora")
        rank = VERA_RANK if vera else RANK  # alpha = rank for VeRA: no scale, as PEFT's VeRA
        dora = "dora" in method or method == "dvora"
        spec = NetworkSpec(dora=dora, rank=rank, alpha=rank if vera else ALPHA, dora_axis=axis, vera=vera)
        inject_adapters(unet, "unet", spec)
    return [p for p in unet.parameters() if p.requires_grad]


def training_step(unet, params: list[torch.nn.Parameter], args: argparse.Namespace):
    """One AdamW step on fixed random inputs (seed 1) at ``args.size``; returns it, the optimizer and the
    inputs (which the memory accounting counts as already there)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet.train()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = training_adamw(params, [unet])
    config, latent = unet.config, args.size // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    generator = torch.Generator(device).manual_seed(1)
    latents, target = (torch.randn(1, 4, latent, latent, device=device, dtype=dtype, generator=generator)
                       for _ in range(2))  # fmt: skip
    context = torch.randn(1, 77, config.cross_attention_dim, device=device, dtype=dtype, generator=generator)
    added = {"text_embeds": torch.randn(1, pooled, device=device, dtype=dtype, generator=generator),
             "time_ids": torch.full((1, 6), float(args.size), device=device, dtype=dtype)}  # fmt: skip
    timestep = torch.tensor([500], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss = F.mse_loss(unet(latents, timestep, context, added_cond_kwargs=added).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    return step, optimizer, [latents, target, context, *added.values()]


def child(method: str, args: argparse.Namespace) -> dict:
    from trainer.training.memory import MemoryTracker, storage_bytes

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = build_unet(args.quick, device, dtype)
    params = apply(method, unet, device, dtype)
    step, optimizer, inputs = training_step(unet, params, args)
    step()  # warm-up; creates the optimizer state
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the timed steps only
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss_peak = _status_kb("VmHWM") * 1024
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    existing = [*unet.parameters(), *unet.buffers(), *state, *inputs]
    quantized = [m.quantized.storage for m in unet.modules() if hasattr(m, "quantized")]
    at_rest = storage_bytes([*existing, *quantized])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        step_peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = MemoryTracker(existing)
        with tracker:
            step()
        step_peak = tracker.peak
    return {
        "method": method,
        "checkpointing": args.checkpointing,
        "seconds": statistics.median(times),
        "rss_peak_gb": rss_peak / GB,
        "allocated_peak_gb": (at_rest + step_peak) / GB,
        "weights_and_state_gb": at_rest / GB,
        "trainable_params": sum(p.numel() for p in params),
    }


def paired(methods: list[str], args: argparse.Namespace) -> list[dict]:
    """Step times of ``methods`` in this process, interleaved: each on a copy of one UNet sharing its frozen
    weights, one step each per round, the order rotating so that no method always runs first."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = build_unet(args.quick, device, dtype)
    frozen = {id(t): t for t in (*unet.parameters(), *unet.buffers())}  # deepcopy hands these back as they are
    steps = {}
    for method in methods:
        copied = copy.deepcopy(unet, memo=dict(frozen))
        steps[method] = training_step(copied, apply(method, copied, device, dtype), args)[0]
        steps[method]()  # warm-up; creates the optimizer state
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(args.reps):
        shift = round_ % len(methods)
        for method in methods[shift:] + methods[:shift]:
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
    first = times[methods[0]]
    return [
        {
            "method": method,
            "checkpointing": args.checkpointing,
            "paired": True,
            "seconds": statistics.median(seconds),
            "seconds_min": min(seconds),
            f"x_{methods[0]}": statistics.median(t / f for t, f in zip(seconds, first)),
            "rounds": [round(t, 3) for t in seconds],
        }
        for method, seconds in times.items()
    ]


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
    parser.add_argument("--reps", type=int, default=3, help="timed steps per method (rounds with --paired)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--paired", action="store_true", help="time the methods in turn in one process")
    parser.add_argument("--checkpointing", action="store_true", help="with --paired: gradient checkpointing on")
    parser.add_argument("--quick", action="store_true", help="the tiny UNet: checks that every method runs")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.paired:
        rows = paired(methods, args)
        _paired_table(rows, args)
    else:
        plan = [(m, False) for m in methods] + [(m, True) for m in methods if m in CHECKPOINTED]
        rows = []
        for method, checkpointing in plan:
            rows.append(run(method, checkpointing, args))
            print(json.dumps(rows[-1]), flush=True)
        _table(rows, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


def _title(args: argparse.Namespace) -> str:
    model = "tiny UNet" if args.quick else "SDXL UNet"
    return f"{model}, {args.size} px, {args.dtype}, {args.device}, batch 1, rank {RANK} (VeRA kinds {VERA_RANK})"


def _paired_table(rows: list[dict], args: argparse.Namespace) -> None:
    ratio = next(key for key in rows[0] if key.startswith("x_"))
    ckpt = ", checkpointing" if args.checkpointing else ""
    print(f"\n{_title(args)}{ckpt}; {args.reps} rounds, one step of each method per round")
    print(f"{'method':<14}{'median s':>9}{'min s':>8}{ratio:>10}  (median of the rounds' ratios)")
    for row in rows:
        print(f"{row['method']:<14}{row['seconds']:>9.2f}{row['seconds_min']:>8.2f}{row[ratio]:>10.3f}")
    print(json.dumps({row["method"]: {"s": round(row["seconds"], 3), ratio: round(row[ratio], 3)} for row in rows}))


def _table(rows: list[dict], args: argparse.Namespace) -> None:
    """Ratios against our LoRA with the same checkpointing, and the one JSON summary line."""
    lora = {row["checkpointing"]: row for row in rows if row["method"] == "lora" and "error" not in row}
    print(f"\n{_title(args)}")
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
