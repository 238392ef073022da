"""DoRA against LoRA, VeRA and DVoRA on the toy model: rank robustness, held-out loss, concept score, weight
decomposition.

Each run is the quick start (``presets/quickstart.toml``: the ``zqx`` ring of ``datasets_example/``, batch 4,
learning rate 1e-3 held constant, attention and convolutions) on ``builtin:toy-sdxl`` (v-prediction, zero
terminal SNR, as it was pretrained) with one adapter variant, rank (convolutions too) and seed, alpha =
rank, trained in-process by the real trainer for the same number of steps. VeRA and DVoRA run at their own
ranks (their factors are shared random matrices: VeRA's paper uses 256 and more) and their own learning rate
(``VERA_LEARNING_RATE``: only vectors train), and the tables give every variant's trainable-parameter count.
Then, on a held-out set of new zqx pictures drawn by ``trainer.builtin.shapes`` (a seed the dataset never used):

- held-out loss: the denoising loss at fixed noise and timesteps (lower is better);
- concept score: samples from held-out captions, read exactly by ``quality_metrics.match_shape``: how much
  better a ring silhouette fits them than any shape the base model knows (the concept margin), and how
  often the ring fits best;
- weight decomposition (the paper's section 3): per layer and saved checkpoint, magnitude change ΔM and
  direction change ΔD of the merged weights; the slope and correlation of ΔM against ΔD, pooled over all
  layers and, as the paper plots it, per layer type (one type across layers and checkpoints), and a PNG.

    python bench/quality.py               # ranks 2 4 8 16 (VeRA, DVoRA: 64 256), every variant, 3 seeds
    python bench/quality.py --seeds 1     # one seed per cell: a third of the time
    python bench/quality.py --steps 320 --ranks 4,16 --variants "LoRA,DoRA input axis"   # longer, fewer
    python bench/quality.py --quick       # a smoke test of all of it in about a minute (numbers mean nothing)

Writes ``quality.json`` and ``quality-decomposition.png`` to ``--out`` (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from quality_metrics import CANDIDATES, match_shape, slope_and_correlation

from trainer.adapters.injection import remove_adapters
from trainer.builtin.resolve import resolve_builtin
from trainer.builtin.shapes import CONCEPT_SHAPE, paint
from trainer.builtin.toy_pretrain import encode_pictures, random_scene, to_tensor
from trainer.config.presets import load_config
from trainer.kohya.adapter_file import load_adapter
from trainer.kohya.analyze import analyze_match
from trainer.kohya.merge import canonical_stems, match_stems, merge_matched, model_stem_targets, pipeline_parts
from trainer.runs.run_directory import RunDirectory
from trainer.sdxl.model_files import load_sdxl_pipeline
from trainer.sdxl.objective import add_noise, prediction_target, training_noise_scheduler
from trainer.sdxl.text_encoding import encode_captions
from trainer.training.loop import Trainer
from trainer.training.network import inject_network, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "quickstart.toml"
MODEL = "builtin:toy-sdxl"
VARIANTS = {
    "LoRA": ("lora", "input"),
    "DoRA input axis": ("dora", "input"),
    "DoRA output axis": ("dora", "output"),
    "VeRA": ("vera", "input"),
    "DVoRA": ("dvora", "input"),
}
SHARED = ("VeRA", "DVoRA")  # factors from shared random matrices: their own ranks and learning rate
VERA_LEARNING_RATE = 1e-2  # VeRA's paper trains its vectors at 10x LoRA's rate and more
TYPES = ("q", "k", "v", "out", "ff")  # the layer types the per-type slopes are given for
HELD_OUT_SEED = 777  # the example dataset draws with 20240611, the toy model's pretraining with 0
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)
GUIDANCE = 5.0


@dataclass(frozen=True)
class Plan:
    ranks: tuple[int, ...]
    vera_ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    checkpoint_every: int
    held_out: int  # pictures for the loss
    samples: int  # held-out captions drawn for the concept score
    sample_steps: int


FULL = Plan(
    ranks=(2, 4, 8, 16),
    vera_ranks=(64, 256),
    seeds=(0, 1, 2),
    steps=64,
    checkpoint_every=16,
    held_out=24,
    samples=12,
    sample_steps=20,
)
QUICK = Plan(
    ranks=(4,), vera_ranks=(16,), seeds=(0,), steps=4, checkpoint_every=2, held_out=4, samples=2, sample_steps=4
)


def ranks_of(variant: str, plan: Plan) -> tuple[int, ...]:
    return plan.vera_ranks if variant in SHARED else plan.ranks


def overrides(variant: str, rank: int, seed: int) -> list[str]:
    """The settings of one run on top of the quick start's."""
    kind, axis = VARIANTS[variant]
    rate = [f"optimizer.learning_rate={VERA_LEARNING_RATE}"] if variant in SHARED else []
    return [
        f"model.path={MODEL}",
        "model.prediction_type=v_prediction",
        "model.zero_terminal_snr=true",
        f"network.kind={kind}",
        f"network.dora_axis={axis}",
        f"network.rank={rank}",
        f"network.alpha={rank}",
        f"network.conv_rank={rank}",
        f"network.conv_alpha={rank}",
        f"training.seed={seed}",
        *rate,
    ]


def train(variant: str, rank: int, seed: int, plan: Plan, work: Path) -> list[tuple[int, Path]]:
    """One quick-start run; returns its saved adapters as (step, path), oldest first."""
    settings = overrides(variant, rank, seed) + [
        f"training.max_steps={plan.steps}",
        "training.epochs=1000",
        "sampling.prompts=[]",  # the bench samples held-out captions itself; the trainer's samples go unread
        "saving.every_n_epochs=0",
        f"saving.every_n_steps={plan.checkpoint_every}",
        "saving.save_state=false",
        "saving.save_dtype=fp32",
        f"dataset.latent_cache_dir={work / 'latents'}",
    ]
    run = RunDirectory(work / f"{variant}-r{rank}-s{seed}".replace(" ", "-"))
    Trainer(load_config(PRESET, settings), run, show_progress=False).run_training()
    saved = []
    for path in run.adapters_dir.glob("*.safetensors"):
        saved.append((int(load_adapter(path).metadata["ss_steps"]), path))
    return sorted(saved)


class Evaluator:
    """The base toy model, a held-out set, and the fixed noise everything is measured with."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.pipe = load_sdxl_pipeline(resolve_builtin(MODEL))
        self.pipe.set_progress_bar_config(disable=True)
        self.base_unet = {key: value.clone() for key, value in self.pipe.unet.state_dict().items()}
        self.parts = pipeline_parts(self.pipe)
        self.targets = model_stem_targets(self.parts)
        rng = random.Random(HELD_OUT_SEED)
        self.scenes = [random_scene(rng, shapes=(CONCEPT_SHAPE,)) for _ in range(plan.held_out)]
        with torch.no_grad():
            means, _ = encode_pictures(self.pipe.vae, to_tensor(paint(scene) for scene in self.scenes))
            self.latents = means * self.pipe.vae.config.scaling_factor
            self.embeds, self.pooled = encode_captions(
                (self.pipe.tokenizer, self.pipe.tokenizer_2),
                (self.pipe.text_encoder, self.pipe.text_encoder_2),
                [scene.caption for scene in self.scenes],
                torch.device("cpu"),
            )
        self.noise = torch.randn((len(EVAL_TIMESTEPS), *self.latents.shape), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The training loss (the toy model's v-prediction target) on the held-out set, fixed noise."""
        config = self.pipe.scheduler.config
        scheduler = training_noise_scheduler(config, config.prediction_type, config.rescale_betas_zero_snr)
        side = self.latents.shape[-1] * 8
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(len(self.latents), -1)
        total = 0.0
        for noise, timestep in zip(self.noise, EVAL_TIMESTEPS):
            timesteps = torch.full((len(self.latents),), timestep)
            noisy = add_noise(scheduler, self.latents, noise, timesteps)
            prediction = self.pipe.unet(
                noisy, timesteps, self.embeds, added_cond_kwargs={"text_embeds": self.pooled, "time_ids": time_ids}
            ).sample
            target = prediction_target(scheduler, self.latents, noise, timesteps)
            total += torch.nn.functional.mse_loss(prediction, target).item()
        return total / len(EVAL_TIMESTEPS)

    @torch.no_grad()
    def concept_score(self) -> dict:
        scenes = self.scenes[: self.plan.samples]
        images = self.pipe(
            prompt=[scene.caption for scene in scenes],
            num_inference_steps=self.plan.sample_steps,
            guidance_scale=GUIDANCE,
            height=scenes[0].size[1],
            width=scenes[0].size[0],
            generator=[torch.Generator().manual_seed(index) for index in range(len(scenes))],
        ).images
        matches = [match_shape(image, scene.background) for image, scene in zip(images, scenes)]
        return {
            "concept_margin": statistics.fmean(match.concept_margin for match in matches),
            "concept_iou": statistics.fmean(match.concept_iou for match in matches),
            "concept_wins": statistics.fmean(match.best == CONCEPT_SHAPE for match in matches),
            "drawn": {shape: sum(match.best == shape for match in matches) for shape in (*CANDIDATES, None)},
            "images": images,
        }

    def decomposition(self, adapter: Path) -> dict[str, list[tuple[str, float, float]]]:
        """Per axis, (layer type, ΔD, ΔM) of every adapted layer for this adapter file (``dora-studio analyze``)."""
        layers = analyze_match(adapter.name, self._match(adapter)).layers
        return {
            axis: [(layer.layer_type, layer.change[axis][1], layer.change[axis][0]) for layer in layers]
            for axis in ("output", "input")
        }

    def trainable_parameters(self, variant: str, rank: int) -> int:
        """What the variant trains at this rank: the network put on the toy model, counted, and taken off."""
        adapters = inject_network(self.pipe, load_config(PRESET, overrides(variant, rank, 0)))
        try:
            return sum(p.numel() for p in trainable_parameters(adapters).values())
        finally:
            for model in (self.pipe.unet, self.pipe.text_encoder, self.pipe.text_encoder_2):
                remove_adapters(model)

    def evaluate(self, adapter: Path | None) -> dict:
        """Loss and concept score with ``adapter`` merged (None: the base model); the base is restored."""
        if adapter is not None:
            merge_matched(self._match(adapter), 1.0)
        try:
            return {"loss": self.held_out_loss(), **self.concept_score()}
        finally:
            self.pipe.unet.load_state_dict(self.base_unet)

    def _match(self, adapter: Path):
        loaded = load_adapter(adapter)
        match = match_stems(canonical_stems(loaded, self.parts).adapters, self.targets)
        if match.unmatched or match.misfit:
            raise RuntimeError(f"{adapter}: does not fit the toy model ({match.unmatched[:3]}, {match.misfit})")
        return match


def _mean_spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cells(runs: list[dict], variant: str, rank: int) -> list[dict]:
    return [run for run in runs if run["variant"] == variant and run["rank"] == rank]


def _fit_cell(fits: list[dict]) -> str:
    """Slope of ΔM on ΔD (mean ± std over seeds) and mean Pearson r; "n/a" where a fit had no spread."""
    slopes = [fit["slope"] for fit in fits if math.isfinite(fit["slope"])]
    if not slopes:
        return "n/a"
    return f"{_mean_spread(slopes, 2)} (r {statistics.fmean(fit['r'] for fit in fits if math.isfinite(fit['r'])):+.2f})"


def print_tables(results: dict, plan: Plan, base: dict) -> None:
    runs, params = results["runs"], results["trainable_parameters"]
    rows = [(variant, rank) for variant in results["variants"] for rank in ranks_of(variant, plan)]
    for title, key, digits in (
        ("Held-out denoising loss (lower is better)", "loss", 4),
        (
            "Concept score: margin of samples, IoU with the zqx ring minus the best plain "
            "shape's (higher is better; above 0: more ring than anything the base model knows)",
            "concept_margin",
            3,
        ),
        ("Samples read as a zqx ring (share)", "concept_wins", 2),
    ):
        print(
            f"\n{title}; mean ± std over seeds {list(plan.seeds)}, {plan.steps} steps; base model: "
            f"{base[key]:.{digits}f}"
        )
        print("| variant | rank | trainable parameters | value |")
        print("|---|---:|---:|---:|")
        for variant, rank in rows:
            value = _mean_spread([run[key] for run in _cells(runs, variant, rank)], digits)
            print(f"| {variant} | {rank} | {params[f'{variant} r{rank}']:,} | {value} |")
    print("\nWeight decomposition: slope of ΔM on ΔD (Pearson r) over all layers and checkpoints, per axis;")
    print("the paper: LoRA positive, full fine-tuning and DoRA negative")
    print("| variant | rank | output axis (PEFT) | input axis (kohya) |")
    print("|---|---:|---:|---:|")
    for variant, rank in rows:
        chosen = _cells(runs, variant, rank)
        cells = [_fit_cell([run["decomposition"][axis] for run in chosen]) for axis in ("output", "input")]
        print(f"| {variant} | {rank} | " + " | ".join(cells) + " |")
    for axis in ("output", "input"):
        print(f"\nPer layer type, as the paper plots it (one type over layers and checkpoints), {axis} axis:")
        print("| variant | rank | " + " | ".join(TYPES) + " |")
        print("|---|---:|" + "---:|" * len(TYPES))
        for variant, rank in rows:
            chosen = _cells(runs, variant, rank)
            cells = [_fit_cell([run["by_type"][axis][kind] for run in chosen]) for kind in TYPES]
            print(f"| {variant} | {rank} | " + " | ".join(cells) + " |")


def plot_decomposition(runs: list[dict], plan: Plan, path: Path) -> None:
    """ΔM against ΔD, one panel per variant and axis, coloured by step, as the paper's figure 2 (LoRA and DoRA
    at rank 4, VeRA and DVoRA at their first rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(VARIANTS), figsize=(4 * len(VARIANTS), 7), squeeze=False)
    for column, variant in enumerate(VARIANTS):
        ranks = ranks_of(variant, plan)
        rank = 4 if 4 in ranks else ranks[0]
        run = _cells(runs, variant, rank)[0]
        for row, axis in enumerate(("output", "input")):
            panel = axes[row][column]
            for step, points in run["trajectory"][axis]:
                _, direction, magnitude = zip(*points)
                panel.scatter(direction, magnitude, s=6, label=f"step {step}")
            fit = run["decomposition"][axis]
            panel.set_title(
                f"{variant}, r={rank}\n{axis} axis: slope {fit['slope']:.2f}, r {fit['r']:+.2f}", fontsize=9
            )
            panel.set_xlabel("ΔD (1 − cosine)")
            panel.set_ylabel("ΔM")
            panel.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fit(points: list[tuple[str, float, float]]) -> dict:
    slope, r = slope_and_correlation([p[1] for p in points], [p[2] for p in points])
    return {"slope": slope, "r": r, "points": len(points)}


def measure(variant: str, rank: int, seed: int, plan: Plan, evaluator: Evaluator, work: Path, out: Path) -> dict:
    """Train one run and measure it: scores of its last adapter, decomposition over all its checkpoints."""
    saved = train(variant, rank, seed, plan, work)
    trajectory = {axis: [] for axis in ("output", "input")}
    for step, path in saved:
        for axis, points in evaluator.decomposition(path).items():
            trajectory[axis].append((step, points))
    scores = evaluator.evaluate(saved[-1][1])
    images = scores.pop("images")
    if seed == plan.seeds[0]:
        images[0].save(out / f"quality-sample-{variant.replace(' ', '-')}-r{rank}.png")
    pooled = {axis: [point for _, points in steps for point in points] for axis, steps in trajectory.items()}
    return {
        "variant": variant,
        "rank": rank,
        "seed": seed,
        **scores,
        "decomposition": {axis: _fit(points) for axis, points in pooled.items()},
        "by_type": {
            axis: {kind: _fit([p for p in points if p[0] == kind]) for kind in TYPES} for axis, points in pooled.items()
        },
        "trajectory": trajectory,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the bench runs")
    parser.add_argument("--seeds", type=int, help="run only this many seeds (default: the plan's 3)")
    parser.add_argument("--variants", help=f"a comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--ranks", help="comma-separated LoRA/DoRA ranks (default: the plan's 2,4,8,16)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the plan's 64)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = replace(plan, seeds=tuple(range(args.seeds)))
    if args.ranks:
        plan = replace(plan, ranks=tuple(int(rank) for rank in args.ranks.split(",")))
    if args.steps:  # four checkpoints per run, as the full plan saves, for the decomposition's trajectory
        plan = replace(plan, steps=args.steps, checkpoint_every=max(1, args.steps // 4))
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    evaluator = Evaluator(plan)
    base = evaluator.evaluate(None)
    base.pop("images")
    params = {
        f"{variant} r{rank}": evaluator.trainable_parameters(variant, rank)
        for variant in variants
        for rank in ranks_of(variant, plan)
    }
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for variant in variants:
            for rank in ranks_of(variant, plan):
                for seed in plan.seeds:
                    runs.append(measure(variant, rank, seed, plan, evaluator, Path(work), args.out))
                    scores = runs[-1]
                    print(
                        f"{variant:<17} rank {rank:>3} seed {seed}: loss {scores['loss']:.4f}  concept margin "
                        f"{scores['concept_margin']:+.3f}  read as zqx {scores['concept_wins']:.2f}  "
                        f"({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
    results = {
        "plan": plan.__dict__,
        "variants": variants,
        "trainable_parameters": params,
        "base": base,
        "runs": runs,
        "seconds": round(time.monotonic() - started),
    }
    written = [args.out / "quality.json"]
    if variants == list(VARIANTS):  # the figure has a column per variant
        plot_decomposition(runs, plan, args.out / "quality-decomposition.png")
        written.append(args.out / "quality-decomposition.png")
    print_tables(results, plan, base)
    summary = [{key: value for key, value in run.items() if key != "trajectory"} for run in runs]
    written[0].write_text(json.dumps({**results, "runs": summary}, indent=1) + "\n")
    print(f"\nwrote {' and '.join(map(str, written))} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
