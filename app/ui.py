"""The studio: a Gradio page over run folders. It configures, starts and watches runs; it trains nothing.

Everything it shows is read from the runs folder on each poll (``app.runs``), and everything it does
goes through ``app.launcher`` (start a trainer process, drop a command file). So a reloaded page, a
second tab or a restarted UI shows the same run in the same state, and no per-tab server state
(``gr.State``) is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.config.kohya_import import load_preset_or_kohya
from trainer.config.parsing import from_dict
from trainer.config.presets import config_from_text, config_toml, load_config, preset_purpose
from trainer.data.check import format_report
from trainer.errors import Problem, StudioError
from trainer.runs.run_directory import RunDirectory
from trainer.training.dataset_config import check_configured

from .compare_tab import compare_tab
from .dataset_tab import dataset_tab
from .estimate import estimate, format_markdown
from .export import TOOLS
from .export_tab import ExportHandlers
from .form import (
    FORM_KEYS,
    build_form,
    config_from_form,
    form_values,
    settings_from_form,
)
from .launcher import resume_run, send_command, start_run
from .plots import loss_frame
from .problems import error_box
from .runs import (
    RunStatus,
    format_eta,
    kept_or,
    list_runs,
    log_tail,
    loss_curves,
    prompt_choices,
    read_metrics,
    read_samples,
    read_status,
    run_label,
    sample_grid,
    samples_for_prompt,
    signature,
)

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
POLL_SECONDS = 2.0
STATE_BADGES = {"done": "finished", "failed": "failed", "died": "stopped unexpectedly", "stopped": "stopped"}


def _preset_choices() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.glob("*.toml"))


def _preset_options() -> list[tuple[str, str]]:
    """The picker's entries: each preset's name with its one-line purpose."""
    return [(f"{name} · {preset_purpose(PRESETS_DIR / name)}".rstrip(" ·"), name) for name in _preset_choices()]


class Studio(ExportHandlers):
    """The handlers, bound to one runs folder."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def _run(self, name: str) -> RunDirectory:
        """The run a browser names; ``RunNameError`` if the name could leave the runs folder."""
        return RunDirectory.named(self.runs_dir, name)

    # -- configure ---------------------------------------------------------------------------------

    def load_preset(self, name: str | None, upload: str | None):
        path = Path(upload) if upload else PRESETS_DIR / (name or "quickstart.toml")
        if not upload and path.name not in _preset_choices():
            return [gr.skip()] * len(FORM_KEYS) + [error_box([Problem(str(name), "unknown preset")])]
        try:
            config, notes = load_preset_or_kohya(path)  # a kohya config is imported, with what did not carry over
        except StudioError as error:
            return [gr.skip()] * len(FORM_KEYS) + [error_box(error.problems)]
        return [*form_values(config), f"Loaded {path.name}." + "".join(f"\n- {note}" for note in notes)]

    def settings_of_run(self, name: str | None):
        """The Configure form filled with a run's own settings (its config.toml), to train again from them."""
        if not name:
            return [gr.skip()] * len(FORM_KEYS) + ["No run selected.", gr.skip()]
        try:
            config = load_config(self._run(name).config_path)
        except StudioError as error:
            return [gr.skip()] * len(FORM_KEYS) + [error_box(error.problems), gr.skip()]
        message = f"The settings of run {name}: change what you like, then Start a new run."
        return [*form_values(config), message, gr.Tabs(selected="configure")]

    def check_data(self, *values):
        """The pre-flight report for the form's dataset settings (the rest of the form may be unfinished)."""
        settings, _ = settings_from_form(list(values))
        try:
            sections = {name: settings[name] for name in ("dataset", "training", "validation")}
            report = check_configured(from_dict(sections, where="form"))
        except StudioError as error:  # ConfigError and DatasetError both say what to fix
            return error_box(error.problems), ""
        return "Dataset checked.", format_report(report)

    def estimate_memory(self, *values):
        """The GPU memory the form's run would need (``dora-studio estimate``), before Start."""
        config, problems = config_from_form(list(values))
        if config is None:
            return error_box(problems)
        folder = self.runs_dir / ".estimates"
        folder.mkdir(exist_ok=True)
        return format_markdown(estimate(config, folder))

    def save_preset(self, *values):
        config, problems = config_from_form(list(values))
        if config is None:
            return gr.skip(), error_box(problems)
        folder = self.runs_dir / ".presets"
        folder.mkdir(exist_ok=True)
        path = folder / f"{config.saving.output_name}.toml"
        path.write_text(config_toml(config), encoding="utf-8")
        return gr.DownloadButton(value=str(path), visible=True), f"Preset ready: {path.name}"

    def start(self, *values):
        config, problems = config_from_form(list(values))
        if config is None:
            return error_box(problems), gr.skip(), gr.skip()
        try:
            name = start_run(self.runs_dir, config)
        except StudioError as error:
            return error_box(error.problems), gr.skip(), gr.skip()
        runs = gr.Dropdown(choices=self._run_choices(list_runs(self.runs_dir)), value=name)
        return f"Started run **{name}**.", runs, gr.Tabs(selected="run")

    # -- watch ---------------------------------------------------------------------------------------

    def _run_choices(self, runs: list[RunStatus]) -> list[tuple[str, str]]:
        """The run picker's entries: each run's label (``runs.run_label``) and its name."""
        return [(run_label(run, self.runs_dir), run.name) for run in runs]

    def initial_run(self):
        """On page load: the active run, else the newest, so a reload or a new tab shows the same run."""
        runs = list_runs(self.runs_dir)
        active = next((run for run in runs if run.alive), None)
        chosen = active or (runs[0] if runs else None)
        return gr.Dropdown(choices=self._run_choices(runs), value=chosen.name if chosen else None)

    def _status_markdown(self, name: str) -> str:
        status = read_status(self._run(name).root)
        parts = [f"### {name}", f"**{STATE_BADGES.get(status.state, status.state)}**"]
        if status.total_steps:
            parts.append(f"step {status.step} / {status.total_steps}")
        if status.epochs:
            parts.append(f"epoch {status.epoch} / {status.epochs}")
        if status.loss is not None:
            parts.append(f"loss {status.loss:.4f}")
        if status.alive and status.eta_seconds:
            parts.append(f"ETA {format_eta(status.eta_seconds)}")
        text = " · ".join(parts[1:])
        message = status.message or ""
        if status.problems:
            return f"{parts[0]}\n{text}\n\n{error_box(status.problems)}"
        if status.state in ("failed", "died"):
            return f"{parts[0]}\n{text}\n\n> **{message}**"
        return f"{parts[0]}\n{text}\n\n{message}"

    def refresh(self, name: str | None, last_signature: str, adapter: str | None = None, prompt: str | None = None):
        """Everything the Run tab shows; unchanged runs skip every output (no traffic, no flicker).

        The user's adapter and prompt stay chosen while they exist; otherwise the run's final adapter (else its
        newest) and the first prompt are, so Export and the compare view open on something."""
        outputs = 7
        if not name:
            # The adapter dropdown gets None, not "": "" is no choice, so its change event would fail.
            return [
                "No run yet: configure one and press Start.",
                None,
                [],
                gr.Dropdown(choices=[]),
                "",
                gr.Dropdown(choices=[], value=None),
                gr.skip(),
            ]
        try:
            run_dir = self._run(name).root
        except StudioError as error:
            return [str(error)] + [gr.skip()] * (outputs - 1)
        current = repr(signature(run_dir))
        if current == last_signature:
            return [gr.skip()] * outputs
        metrics = read_metrics(run_dir)
        plot = loss_frame(loss_curves(metrics))
        samples = read_samples(run_dir)
        grid, columns = sample_grid(samples)
        gallery = gr.Gallery(
            value=[(str(s.path), f"{s.epoch_label} · {s.index}: {s.prompt}") for s in grid], columns=columns
        )
        choices = prompt_choices(samples)
        adapters = self._adapter_choices(run_dir)
        last = Path(read_status(run_dir).last_adapter).name
        return [
            self._status_markdown(name),
            plot,
            gallery,
            gr.Dropdown(choices=choices, value=kept_or(prompt, [value for _, value in choices])),
            log_tail(run_dir),
            gr.Dropdown(choices=adapters, value=kept_or(adapter, adapters, preferred=last)),
            current,
        ]

    def compare(self, name: str | None, prompt_index: str | None):
        if not name or prompt_index is None:
            return []
        samples = samples_for_prompt(read_samples(self._run(name).root), int(prompt_index))
        return [(str(s.path), s.epoch_label) for s in samples]

    # -- control -------------------------------------------------------------------------------------

    def command(self, name: str | None, command: str) -> str:
        if not name:
            return "No run selected."
        try:
            send_command(self.runs_dir, name, command)
        except StudioError as error:
            return str(error)
        return {
            "stop": "Stopping after this step (the adapter and state are saved first).",
            "save": "Saving after this step.",
            "sample": "Sampling after this step.",
        }[command]

    def resume(self, name: str | None) -> str:
        if not name:
            return "No run selected."
        try:
            resume_run(self.runs_dir, name)
        except StudioError as error:
            return str(error)
        return f"Resuming {name}."

    # -- API (plain types, for scripts and gradio_client) -------------------------------------------

    def api_start(self, preset_toml: str) -> str:
        """Start a run from preset text (TOML, paths relative to presets/); returns the run name."""
        with _as_user_error():
            return start_run(self.runs_dir, config_from_text(preset_toml, PRESETS_DIR, where="start_run"))

    def api_status(self, name: str) -> dict[str, Any]:
        """The run's status (state, step, total_steps, epoch, eta_seconds, loss, message, ...)."""
        with _as_user_error():
            status = read_status(self._run(name).root)
        return dataclasses.asdict(status) | {"name": name}  # problems as {"where", "message"} dicts

    def api_stop(self, name: str) -> str:
        """Ask the run to save and stop after its current step."""
        with _as_user_error():
            send_command(self.runs_dir, name, "stop")
        return "stopping"


@contextlib.contextmanager
def _as_user_error() -> Iterator[None]:
    """Refusals reach API callers as their message (gr.Error), not as a server traceback."""
    try:
        yield
    except StudioError as error:
        raise gr.Error(str(error)) from None


def build(runs_dir: Path) -> gr.Blocks:
    studio = Studio(runs_dir)
    with gr.Blocks(title="DoRA Studio", analytics_enabled=False) as demo:
        gr.Markdown("# DoRA Studio\nTrain LoRA and DoRA adapters for SDXL.")
        with gr.Tabs() as tabs:
            with gr.Tab("Configure", id="configure"):
                with gr.Row():
                    preset = gr.Dropdown(choices=_preset_options(), value="quickstart.toml", label="Preset")
                    upload = gr.File(label="or upload a preset or kohya config", file_types=[".toml", ".json"])
                    load = gr.Button("Load preset")
                form = build_form(load_config(PRESETS_DIR / "quickstart.toml"))
                inputs = list(form.values())
                message = gr.Markdown()
                with gr.Row():
                    check = gr.Button("Check dataset")
                    estimate_button = gr.Button("Estimate GPU memory")
                    save = gr.Button("Save as preset")
                    download_preset = gr.DownloadButton("Download preset", visible=False)
                    start = gr.Button("Start", variant="primary")
                memory = gr.Markdown()
                report = gr.Code(label="Dataset report", language=None, interactive=False)
            with gr.Tab("Dataset", id="dataset") as data_tab:
                dataset_tab(studio.runs_dir, inputs, data_tab)
            with gr.Tab("Run", id="run"):
                run = gr.Dropdown(label="Run", choices=[], allow_custom_value=False)
                status = gr.Markdown()
                with gr.Row():
                    stop = gr.Button("Stop (saves first)", variant="stop")
                    save_now = gr.Button("Save now")
                    sample_now = gr.Button("Sample now")
                    resume = gr.Button("Resume")
                    again = gr.Button("Train again from these settings")
                control = gr.Markdown()
                loss = gr.LinePlot(x="step", y="loss", color="series", x_axis_format="d", label="Loss", height=340)
                gallery = gr.Gallery(
                    label="Samples: a row per prompt, a column per sampling, the newest at the right",
                    columns=6,
                    height="auto",
                    object_fit="contain",
                )
                prompt = gr.Dropdown(label="Compare one prompt across epochs", choices=[])
                compare = gr.Gallery(label="Same prompt, oldest first", columns=6, height="auto")
                log = gr.Textbox(label="Log (last lines)", lines=12, max_lines=12, autoscroll=True)
            with gr.Tab("Export", id="export") as export_tab:
                adapter = gr.Dropdown(label="Adapter", choices=[])
                summary = gr.Code(label="inspect", language=None, interactive=False)
                download = gr.DownloadButton("Download", visible=False)
                verify = gr.Button("Verify against the base model (ComfyUI, Forge, A1111, InvokeAI)")
                verified = gr.Code(label="verify", language=None, interactive=False)
                analyze = gr.Button("Analyze the run: which layers changed, in magnitude or in direction (DoRA paper)")
                analysis_plot = gr.Image(label="ΔM against ΔD per layer type", interactive=False)
                analysis = [analysis_plot, gr.Code(label="analyze", language=None, interactive=False)]
                with gr.Row():
                    tool = gr.Radio(list(TOOLS), value="resize", label="Make a new file from this adapter")
                    rank = gr.Number(label="rank (to resize to; optional to convert to LoRA)", precision=0, minimum=1)
                    make = gr.Button("Make")
                made = gr.Code(label="resize / convert: the error of each layer against this adapter", language=None)
                download_made = gr.DownloadButton("Download the new file", visible=False)
            with gr.Tab("Compare", id="compare"):
                compare_tab(runs_dir)
        last_signature = gr.Textbox(visible=False)

        load.click(studio.load_preset, [preset, upload], [*inputs, message])
        check.click(studio.check_data, inputs, [message, report])
        estimate_button.click(studio.estimate_memory, inputs, memory)
        save.click(studio.save_preset, inputs, [download_preset, message])
        start.click(studio.start, inputs, [message, run, tabs])
        demo.load(studio.initial_run, None, run)
        refresh_outputs = [status, loss, gallery, prompt, log, adapter, last_signature]
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(studio.refresh, [run, last_signature, adapter, prompt], refresh_outputs, show_progress="hidden")
        run.change(studio.refresh, [run, gr.Textbox(value="", visible=False), adapter, prompt], refresh_outputs)
        prompt.change(studio.compare, [run, prompt], compare)
        stop.click(lambda name: studio.command(name, "stop"), run, control)
        save_now.click(lambda name: studio.command(name, "save"), run, control)
        sample_now.click(lambda name: studio.command(name, "sample"), run, control)
        resume.click(studio.resume, run, control)
        again.click(studio.settings_of_run, run, [*inputs, message, tabs])
        adapter.change(studio.show_adapter, [run, adapter], [summary, download, verified])
        verify.click(studio.verify, [run, adapter], verified)
        analyze.click(lambda name: studio.analysis(name, now=True), run, analysis)
        make.click(studio.make_file, [run, adapter, tool, rank], [made, download_made])
        export_tab.select(lambda name: studio.analysis(name, now=False), run, analysis)  # the stored one
        run.change(lambda name: studio.analysis(name, now=False), run, analysis)
        gr.api(studio.api_start, api_name="start_run")
        gr.api(studio.api_status, api_name="run_status")
        gr.api(studio.api_stop, api_name="stop_run")
    return demo
