"""Training-step time and memory: our LoRA/DoRA against PEFT and LyCORIS on SDXL-shaped work.

Why a whole step: DoRA's cost claim (docs/benchmarks.md) is about what a user pays per optimizer step, so
this times zero_grad + forward + backward + AdamW, not one layer. Two workloads:
  * real diffusers BasicTransformerBlocks between proj_in/proj_out (the Linears of an SDXL Transformer2DModel,
    where nearly all of an SDXL step's adapted FLOPs are), at SDXL widths and token counts;
  * the tiny SDXL-layout UNet (722 adapted Linears at tiny widths), where per-layer overhead dominates.
Each (method, case) runs in its own process, so peak memory and allocator state cannot leak between methods.

    python bench/adapter_step.py --quick
    python bench/adapter_step.py --cases w1280_t1024 --methods lora,dora --reps 7 --json-out out.json
    python bench/adapter_step.py --profile dora w1280_t1024    # top ops of one step, by self CPU time
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.third_party import apply_lycoris_dora, apply_peft, training_adamw

METHODS = ("none", "lora", "dora", "dora-output", "peft-lora", "peft-dora", "lycoris-dora")
BLOCK_CASES = {
    "w640_t1024": (640, 1024),
    "w640_t4096": (640, 4096),
    "w1280_t1024": (1280, 1024),
    "w1280_t4096": (1280, 4096),
}
CASES = (*BLOCK_CASES, "tiny_unet")
QUICK_CASES, QUICK_METHODS = ("w640_t1024", "tiny_unet"), ("lora", "dora", "peft-dora")
RANK, ALPHA, WARMUP_STEPS, MB = 16, 16.0, 2, 2**20
THREADS = len(os.sched_getaffinity(0))
CLEAN_BELOW = 0.2  # cores other processes may use during a timed step before it is set aside


@dataclass
class Workload:
    """A frozen model, the module paths every method adapts, and a loss closure over fixed inputs."""

    model: nn.Module
    targets: list[str]
    rank: int
    loss: Callable[[torch.Tensor | None], torch.Tensor]  # takes an input gain: the `none` method's only parameter
    is_unet: bool  # our layers go in through inject_adapters (kohya's UNet targets) rather than one by one
    keep_alive: list = field(default_factory=list)  # e.g. the LyCORIS network, which is not a submodule


class BlockStack(nn.Module):
    """The Linears of an SDXL Transformer2DModel: GroupNorm, proj_in, BasicTransformerBlocks, proj_out, residual."""

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                dim,
                num_attention_heads=dim // 64,
                attention_head_dim=64,
                cross_attention_dim=2048,
                activation_fn="geglu",
                only_cross_attention=False,
                upcast_attention=False,
                norm_type="layer_norm",
            )
            for _ in range(blocks)
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(self.norm(hidden_states.transpose(1, 2)).transpose(1, 2))
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states=encoder_hidden_states)
        return self.proj_out(h) + hidden_states


def build_workload(case: str, device: torch.device, blocks: int, latent_size: int) -> Workload:
    """The case's model (seed 0, so every method adapts the same weights) and fixed random inputs."""
    torch.manual_seed(0)
    gained = lambda x, gain: x if gain is None else x * gain  # noqa: E731
    if case in BLOCK_CASES:
        dim, tokens = BLOCK_CASES[case]
        model = BlockStack(dim, blocks).to(device).train()
        shapes = [(1, tokens, dim), (1, 77, 2048), (1, tokens, dim)]
        x, context, target = (torch.randn(shape, device=device) for shape in shapes)
        targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        return Workload(model, targets, RANK, lambda g: F.mse_loss(model(gained(x, g), context), target), False)
    from trainer.adapters.injection import target_module_paths
    from trainer.builtin.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0).unet.to(device).train()
    targets = target_module_paths(unet, "unet", "attn")
    narrowest = min(min(unet.get_submodule(p).in_features, unet.get_submodule(p).out_features) for p in targets)
    cfg, pixels = unet.config, float(latent_size * 8)
    latents = torch.randn(1, cfg.in_channels, latent_size, latent_size, device=device)
    noise, context = torch.randn_like(latents), torch.randn(1, 77, cfg.cross_attention_dim, device=device)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(1, text_dim, device=device),
        "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]], device=device),
    }
    timestep = torch.tensor([500], device=device)

    def loss(gain: torch.Tensor | None) -> torch.Tensor:
        return F.mse_loss(unet(gained(latents, gain), timestep, context, added_cond_kwargs=added).sample, noise)

    return Workload(unet, targets, min(RANK, narrowest), loss, True)


def apply_method(method: str, work: Workload, device: torch.device) -> tuple[list[nn.Parameter], nn.Parameter | None]:
    """Freeze the base, wrap every target; returns (what AdamW trains, the input gain for `none` else None)."""
    model, rank = work.model, work.rank
    model.requires_grad_(False)
    if method == "none":  # nothing to adapt: one scalar on the input keeps backward running through every layer
        gain = nn.Parameter(torch.ones((), device=device))
        return [gain], gain
    if method in ("lora", "dora", "dora-output"):
        dora, axis = method != "lora", ("output" if method == "dora-output" else "input")
        if work.is_unet:
            from trainer.adapters.injection import NetworkSpec, inject_adapters

            inject_adapters(model, "unet", NetworkSpec(dora=dora, rank=rank, alpha=ALPHA, dora_axis=axis), "attn")
        else:
            from trainer.adapters.injection import make_adapter
            from trainer.adapters.layers import AdapterSpec, DoRALayer
            from trainer.adapters.norm_group import DoRANormGroup

            layers = []
            for path in work.targets:
                parent, _, child = path.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                layers.append(make_adapter(getattr(owner, child), AdapterSpec(rank, ALPHA, dora, axis)))
                setattr(owner, child, layers[-1])
            DoRANormGroup(layer for layer in layers if isinstance(layer, DoRALayer))  # as inject_adapters does
    elif method in ("peft-lora", "peft-dora"):
        apply_peft(model, work.targets, rank, ALPHA, dora=method == "peft-dora")
    elif method == "lycoris-dora":
        network = apply_lycoris_dora(model, work.targets, rank, ALPHA).to(device)
        work.keep_alive.append(network)
        return list(network.parameters()), None
    else:
        raise ValueError(f"unknown method {method!r}")
    return [p for p in model.parameters() if p.requires_grad], None


def train_step(work: Workload, gain: torch.Tensor | None, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    work.loss(gain).backward()
    optimizer.step()


def saved_activation_bytes(work: Workload, gain: torch.Tensor | None, exclude: set[int]) -> int:
    """Bytes autograd holds for backward after one forward, unique by storage, parameters/buffers excluded.

    Weight-sized temporaries a method builds in forward (a merged W, PEFT's k x k identity) do count: the
    method holds them until backward, just like activations. A tensor saved by a graph that was then dropped
    (e.g. under a .detach()) does not: only packed tensors still alive when the forward ends are counted.
    """
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t  # autograd keeps this very object until backward, so the weak reference tracks its lifetime

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = work.loss(gain)
    sizes = {ptr: nbytes for ref, ptr, nbytes in packed if ref() is not None and ptr not in exclude}
    del loss
    return sum(sizes.values())


def optimizer_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Trainable parameters + their gradients + AdamW's moments (after at least one step)."""
    return sum(
        p.numel() * p.element_size() * (1 + (p.grad is not None))
        + sum(s.numel() * s.element_size() for s in optimizer.state[p].values() if torch.is_tensor(s))
        for p in params
    )


def _proc_status_kb(key: str) -> int:
    return next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(key + ":")
    )


def _cpu_busy_s() -> float:
    """CPU seconds all processes on the machine have used (/proc/stat, steal included); 0 where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_s: float, idle_below: float = CLEAN_BELOW) -> float:
    """Others may share these cores: wait (up to max_s) for a 1 s window in which they use < idle_below cores."""
    deadline = time.monotonic() + max_s
    while True:
        before = _cpu_busy_s()
        time.sleep(1.0)
        if (busy := _cpu_busy_s() - before) < idle_below or time.monotonic() >= deadline:
            return busy


def prepare(method: str, case: str, args: argparse.Namespace):
    """Model, adapters and optimizer, warmed up; plus a sync that makes wall-clock timing honest on CUDA."""
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    work = build_workload(case, device, args.blocks, args.latent_size)
    params, gain = apply_method(method, work, device)
    optimizer = training_adamw(params, [work.model, *(m for m in work.keep_alive if isinstance(m, nn.Module))])
    for _ in range(WARMUP_STEPS):
        train_step(work, gain, optimizer)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    return device, work, params, gain, optimizer, sync


def run_child(method: str, case: str, args: argparse.Namespace) -> dict:
    """One method on one case, in a fresh process; returns the JSON-able measurements."""
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device, work, params, gain, optimizer, sync = prepare(method, case, args)
    try:  # resetting VmHWM makes the peak cover the timed steps only
        Path("/proc/self/clear_refs").write_text("5")
        rss_how, rss_before_kb = "VmHWM after clear_refs=5", _proc_status_kb("VmRSS")
    except OSError:
        rss_how = "ru_maxrss (monotone: includes the build and warm-up)"
    # Others may share these cores, and two OpenMP threads on a busy core slow small ops tenfold or worse: a step
    # counts only if the rest of the machine stayed under CLEAN_BELOW cores; at most 3x reps steps are tried.
    times, others = [], []
    while sum(o < CLEAN_BELOW for o in others) < args.reps and len(times) < 3 * args.reps:
        sync()
        busy_before, own_before, start = _cpu_busy_s(), time.process_time(), time.perf_counter()
        train_step(work, gain, optimizer)
        sync()
        wall = time.perf_counter() - start
        times.append(wall * 1e3)
        others.append(max(0.0, (_cpu_busy_s() - busy_before - (time.process_time() - own_before)) / wall))
    clean = [t for t, o in zip(times, others) if o < CLEAN_BELOW] or times
    rss_peak_kb = (
        _proc_status_kb("VmHWM") - rss_before_kb
        if rss_how.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    )
    total = sum(p.numel() for p in params)
    lowrank = sum(p.numel() for p in params if p.dim() == 2 and min(p.shape) > 1)  # a magnitude has a dim of 1
    result = {
        "method": method,
        "case": case,
        "device": str(device),
        "threads": THREADS,
        "reps": args.reps,
        "blocks": args.blocks if case in BLOCK_CASES else None,
        "rank": work.rank,
        "adapted_layers": len(work.targets),
        "trainable_params": total,
        "lowrank_params": lowrank,
        "magnitude_params": 0 if gain is not None else total - lowrank,
        "ms_median": statistics.median(clean),
        "ms_min": min(clean),
        "ms_max": max(clean),
        "steps_timed": len(times),
        "steps_clean": sum(o < CLEAN_BELOW for o in others),
        "other_cores_busy": round(statistics.median(others), 2),
        "rss_peak_increase_mb": rss_peak_kb / 1024,
        "rss_method": rss_how,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(work, gain, optimizer)
        sync()
        result["peak_step_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
    exclude = {
        t.untyped_storage().data_ptr() for m in (work.model, *work.keep_alive) for t in (*m.parameters(), *m.buffers())
    } | {p.untyped_storage().data_ptr() for p in params}
    activations = saved_activation_bytes(work, gain, exclude)
    result["activations_mb"] = activations / MB
    result["train_state_mb"] = (activations + optimizer_state_bytes(params, optimizer)) / MB
    return result


def run_profile(method: str, case: str, args: argparse.Namespace) -> None:
    """Print the top ops of one training step (after warm-up) by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    device, work, params, gain, optimizer, sync = prepare(method, case, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(work, gain, optimizer)
        sync()
    print(f"profile: {method} on {case} ({device}, {THREADS} threads)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return round(a[key] / b[key], 3) if a and b and a.get(key) is not None and b.get(key) else None


def _memory_key(rows: list[dict]) -> str:
    return "peak_step_mb" if rows and rows[0]["device"].startswith("cuda") else "train_state_mb"


def print_table(case: str, rows: list[dict]) -> None:
    if not rows:
        return
    first, mem = rows[0], _memory_key(rows)
    lora = next((r for r in rows if r["method"] == "lora"), None)
    blocks = f"{first['blocks']} block(s), " if first["blocks"] else ""
    print(
        f"\n== {case}: {blocks}{first['adapted_layers']} adapted Linears, rank {first['rank']}, fp32, "
        f"{first['device']}, {first['threads']} threads, median of {first['reps']} clean steps; mem = {mem}"
    )
    print(
        f"{'method':<13}{'trainable':>10}{'lowrank':>10}{'magn.':>7}{'ms median':>11}{'(min-max)':>15}"
        f"{'x lora':>8}{'mem MB':>9}{'x lora':>8}{'activ MB':>10}{'RSS+ MB':>9}{'busy':>6}"
    )
    for r in rows:
        t_ratio, m_ratio = _ratio(r, lora, "ms_median"), _ratio(r, lora, mem)
        spread = f"({r['ms_min']:.0f}-{r['ms_max']:.0f})"
        print(
            f"{r['method']:<13}{r['trainable_params']:>10}{r['lowrank_params']:>10}{r['magnitude_params']:>7}"
            f"{r['ms_median']:>11.1f}{spread:>15}{str(t_ratio or '-'):>8}"
            f"{r[mem]:>9.1f}{str(m_ratio or '-'):>8}{r['activations_mb']:>10.1f}"
            f"{r['rss_peak_increase_mb']:>9.1f}{r['other_cores_busy']:>6.2f}"
        )
    print(
        f"(mem: activations saved for backward + trainable params, grads, AdamW state; RSS+ = peak RSS increase "
        f"over the timed steps, via {first['rss_method']}; busy = median cores other processes used per timed step; "
        f"steps with busy >= {CLEAN_BELOW} are set aside unless none is clean)"
    )


def headline(results: list[dict]) -> dict:
    """The summary JSON, on the widest 1024-token block case that ran (w1280_t1024 if present)."""
    by = {(r["case"], r["method"]): r for r in results}
    ran = [c for c in ("w1280_t1024", "w640_t1024", *BLOCK_CASES) if (c, "lora") in by]
    case, mem = (ran[0] if ran else next((r["case"] for r in results), None)), _memory_key(results)

    def vs(a: str, b: str, key: str = "ms_median", where: str | None = None) -> float | None:
        return _ratio(by.get((where or case, a)), by.get((where or case, b)), key)

    return {
        "dora_vs_lora": vs("dora", "lora"),
        "dora_vs_lora_mem": vs("dora", "lora", mem),
        "peft_dora_vs_dora": vs("peft-dora", "dora"),
        "lycoris_dora_vs_dora": vs("lycoris-dora", "dora"),
        "dora_output_vs_lora": vs("dora-output", "lora"),
        "case": case,
        "peft_dora_vs_dora_mem": vs("peft-dora", "dora", mem),
        "lycoris_dora_vs_dora_mem": vs("lycoris-dora", "dora", mem),
        "peft_lora_vs_lora": vs("peft-lora", "lora"),
        "none_vs_lora": vs("none", "lora"),
        "tiny_unet_dora_vs_lora": vs("dora", "lora", where="tiny_unet"),
        "tiny_unet_peft_dora_vs_dora": vs("peft-dora", "dora", where="tiny_unet"),
        "memory_metric": mem,
        "device": results[0]["device"] if results else None,
        "threads": THREADS,
    }


def adapter_code_digest() -> str:
    """A short hash of our adapter code: it changes often, and a result is only meaningful with its version."""
    adapters = Path(__file__).resolve().parents[1] / "trainer" / "adapters"
    code = b"".join(path.read_bytes() for path in sorted(adapters.glob("*.py")))
    return hashlib.sha256(code).hexdigest()[:12]


def run_parent(args: argparse.Namespace) -> None:
    cases = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else CASES)
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    if unknown := (set(cases) - set(CASES)) | (set(methods) - set(METHODS)):
        raise SystemExit(f"unknown case/method {sorted(unknown)}; cases: {CASES}; methods: {METHODS}")
    if "lycoris-dora" in methods and importlib.util.find_spec("lycoris") is None:
        print("skipping lycoris-dora: the lycoris package is not importable (pip install 'dora-studio[bench]')")
        methods.remove("lycoris-dora")
    digest = adapter_code_digest()
    print(
        f"torch {torch.__version__}, device {args.device}, torch.set_num_threads({THREADS}) in every child; "
        f"up to {args.wait_idle:.0f} s wait for idle cores before each child; adapter code {digest}"
    )
    results = []
    for case in cases:
        for method in methods:
            for attempt in range(1 + args.retries):  # a child that found too few quiet steps runs again
                idle = wait_for_idle(args.wait_idle * (1 + attempt)) if args.wait_idle > 0 else None
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    method,
                    case,
                    "--reps",
                    str(args.reps),
                    "--device",
                    args.device,
                    "--blocks",
                    str(args.blocks),
                    "--latent-size",
                    str(args.latent_size),
                ]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode or not lines:
                    print(f"  {case} {method}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                    break
                run = json.loads(lines[-1])
                print(
                    f"  {case} {method}: {run['ms_median']:.1f} ms; {run['steps_clean']} of {run['steps_timed']} "
                    f"steps clean; others busy {run['other_cores_busy']} cores (before: "
                    f"{idle if idle is None else round(idle, 2)}; {time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
                if run["steps_clean"] >= args.reps or attempt == args.retries:
                    results.append(run)
                    break
    for case in cases:
        print_table(case, [r for r in results if r["case"] == case])
    summary = {**headline(results), "adapter_code": digest}
    if adapter_code_digest() != digest:
        print(f"WARNING: trainer adapter code changed during the run ({digest} -> {adapter_code_digest()})")
        summary["adapter_code"] = f"{digest}->{adapter_code_digest()} (changed mid-run)"
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="w640_t1024 and tiny_unet; lora, dora, peft-dora")
    parser.add_argument("--cases", help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--reps", type=int, help="timed steps per method and case (default 5; 3 with --quick)")
    parser.add_argument("--blocks", type=int, default=1, help="BasicTransformerBlocks per stack (same for all)")
    parser.add_argument("--latent-size", type=int, default=32, help="tiny UNet latent height = width")
    parser.add_argument(
        "--wait-idle", type=float, help="max s to wait for idle cores before each child (default 30; 0 with --quick)"
    )
    parser.add_argument("--retries", type=int, default=1, help="re-run a child that got fewer than reps quiet steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", help="also write every measurement here")
    parser.add_argument("--profile", nargs=2, metavar=("METHOD", "CASE"), help="profile one step instead")
    parser.add_argument("--profile-rows", type=int, default=10)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.reps = args.reps or (3 if args.quick else 5)
    args.wait_idle = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 30.0)
    if args.child:
        print(json.dumps(run_child(*args.child, args)))
    elif args.profile:
        run_profile(*args.profile, args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
