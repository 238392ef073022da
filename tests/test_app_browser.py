"""The studio in a real browser: fix a caption on the Dataset tab, configure the quick start, train it, watch
it, reload, export the adapter.

The UI runs as ``dora-studio ui`` in its own process and trains the built-in tiny model for 12 steps, so
this is the whole path a user takes, from a click to a downloaded file that ``inspect`` reads. A
screenshot of every stage lands in ``test-artifacts/browser/`` (with the UI's and the trainer's logs),
and the page must not make a single request to a host other than this machine.

Needs Debian's ``chromium`` at /usr/bin/chromium and playwright-python (``.ci/run`` installs both);
without them the module is skipped. ``playwright install`` is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.runs import pid_alive
from trainer.config.presets import load_config

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("no /usr/bin/chromium (Debian package 'chromium'; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright-python is not installed (pip install -e '.[test]')"
)
expect = sync_api.expect

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
MAX_STEPS = 12
ADAPTER = "quickstart-dora.safetensors"
UI_START_S = 90  # importing gradio and torch on two busy cores
# The 12-step run takes ~20 s on two idle cores, but minutes when the cores are shared with other jobs.
PROGRESS_S = 180  # from Start to two steps, a loss curve and the base model's samples
FINISH_S = 300  # from there to "finished"
STEP_TIMEOUT_MS = 20_000  # one page change: a form drawn, a tab switched, a dropdown filled, an image loaded


def _offline_env(cache_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "DORA_STUDIO_CACHE": str(cache_dir),
        "PYTHONUNBUFFERED": "1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the UI exited with {process.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the UI did not answer on {url} within {UI_START_S} s:\n{log.read_text()[-3000:]}")


def _stop_process(pid: int, grace_s: float) -> None:
    """SIGTERM (a trainer saves and stops), then SIGKILL if it is still there after ``grace_s``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop_trainers(runs_dir: Path) -> None:
    """The trainer runs in its own session and outlives the UI: stop any still at work."""
    for status_path in runs_dir.glob("*/status.json"):
        try:
            pid = json.loads(status_path.read_text()).get("pid")
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            _stop_process(pid, grace_s=30)


def _keep_logs(runs_dir: Path, ui_log: Path) -> None:
    """The UI's log and each run's logs beside the screenshots, for a CI failure to be read later."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if ui_log.is_file():
        shutil.copyfile(ui_log, ARTIFACTS / "ui.log")
    for log in [*runs_dir.glob("*/train.log"), *runs_dir.glob("*/console.log")]:
        shutil.copyfile(log, ARTIFACTS / f"run-{log.name}")


@pytest.fixture(scope="session")
def studio_cache(tmp_path_factory) -> Path:
    """DORA_STUDIO_CACHE: the trainer builds builtin:tiny-sdxl here on first use, then reuses it."""
    return tmp_path_factory.mktemp("dora-studio-cache")


@pytest.fixture
def studio(tmp_path, studio_cache) -> Iterator[tuple[str, Path]]:
    """``dora-studio ui`` on a free port over an empty runs folder: (url, runs folder)."""
    runs_dir, ui_log = tmp_path / "runs", tmp_path / "ui.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    with ui_log.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "ui", "--runs-dir", str(runs_dir), "--port", str(port)],
            cwd=ROOT,
            env=_offline_env(studio_cache),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_serving(url, process, ui_log)
        yield url, runs_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        _stop_trainers(runs_dir)
        _keep_logs(runs_dir, ui_log)


@pytest.fixture
def browser_page() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            yield context.new_page()
        finally:
            browser.close()


# Gradio shows a failed event as an error toast that fades after a few seconds: note each one as it
# appears, so none is missed between two looks at the page.
RECORD_ERROR_TOASTS = """
window.errorToasts = [];
new MutationObserver(() => {
    for (const toast of document.querySelectorAll(".toast-body.error:not([data-noted])")) {
        toast.dataset.noted = "1";
        window.errorToasts.push(toast.innerText.replace(/\\s+/g, " "));
    }
}).observe(document, {childList: true, subtree: true});
"""


class Stages:
    """Full-page screenshots, numbered in the order taken, and the error toasts shown up to each one."""

    def __init__(self, page):
        self.page, self.count, self.errors = page, 0, []
        page.add_init_script(RECORD_ERROR_TOASTS)  # on every load, reloads included
        if ARTIFACTS.exists():
            shutil.rmtree(ARTIFACTS)
        ARTIFACTS.mkdir(parents=True)

    def collect_errors(self, stage: str) -> None:
        """Before a screenshot and before a reload (which starts a new list)."""
        self.errors += [f"{stage}: {text}" for text in self.page.evaluate("window.errorToasts.splice(0)")]

    def snap(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.count:02d}-{name}.png"), full_page=True)
        self.collect_errors(name)


def _foreign_request(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob"):
        return False
    return parts.hostname not in LOCAL_HOSTS


def test_quickstart_in_a_browser(studio, browser_page, tmp_path):
    url, runs_dir = studio
    page = browser_page
    requests: list[str] = []
    page.context.on("request", lambda request: requests.append(request.url))
    page.on("websocket", lambda socket_: requests.append(socket_.url))
    stages = Stages(page)
    try:
        _dataset_tab(page, url, tmp_path, stages)
        _configure_and_start(page, url, stages)
        run_name = _watch_the_run(page, runs_dir, stages)
        _reload_mid_run(page, run_name, stages)
        _wait_until_finished(page, run_name, runs_dir, stages)
        _export(page, runs_dir / run_name, tmp_path, stages)
        _compare(page, runs_dir, run_name, stages)
    except Exception:
        with contextlib.suppress(Exception):  # the failure itself matters more than its picture
            stages.snap("failed")
        raise
    foreign = sorted({u for u in requests if _foreign_request(u)})
    assert not foreign, f"the page reached beyond this machine: {foreign}"
    assert any(urlsplit(u).hostname in LOCAL_HOSTS for u in requests)  # the recorder did record
    assert not stages.errors, f"the page showed errors: {stages.errors}"


def _dataset_tab(page, url: str, tmp_path: Path, stages: Stages) -> None:
    """The Dataset tab on a copy of the example dataset: its thumbnails; a caption edited and saved, an image
    excluded and restored, each checked on disk."""
    dataset = tmp_path / "dataset"
    shutil.copytree(ROOT / "datasets_example", dataset)
    folder = dataset / "10_zqx"
    page.goto(url)
    page.get_by_role("tab", name="Dataset").click()
    box = page.get_by_label("folder to show")
    expect(box).to_have_value(re.compile("datasets_example"), timeout=STEP_TIMEOUT_MS)  # the form's, opened
    box.fill(str(dataset))
    page.get_by_role("button", name="Open", exact=True).click()
    thumbnail = page.locator("img[alt^='zqx_01.png: ']")
    expect(thumbnail).to_be_visible(timeout=STEP_TIMEOUT_MS)
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle(), timeout=STEP_TIMEOUT_MS
    )
    stages.snap("dataset")

    thumbnail.click()
    image = page.get_by_label("image", exact=True)
    expect(image).to_have_value("10_zqx/zqx_01.png", timeout=STEP_TIMEOUT_MS)
    caption = page.get_by_role("textbox", name=re.compile(r"^caption saved as UTF-8"))
    expect(caption).to_have_value(" ".join((folder / "zqx_01.txt").read_text().split()), timeout=STEP_TIMEOUT_MS)
    caption.fill("zqx, edited in the browser")
    page.get_by_role("button", name="Save caption").click()
    expect(page.get_by_text("Saved zqx_01.txt.")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    assert (folder / "zqx_01.txt").read_text(encoding="utf-8") == "zqx, edited in the browser\n"

    page.get_by_role("button", name=re.compile(r"^Exclude")).click()
    expect(image).to_have_value("10_zqx/0_excluded/zqx_01.png", timeout=STEP_TIMEOUT_MS)
    assert not (folder / "zqx_01.png").exists() and (folder / "0_excluded" / "zqx_01.txt").is_file()
    stages.snap("dataset-excluded")
    page.get_by_role("button", name="Restore", exact=True).click()
    expect(image).to_have_value("10_zqx/zqx_01.png", timeout=STEP_TIMEOUT_MS)
    assert (folder / "zqx_01.png").is_file() and (folder / "zqx_01.txt").is_file()
    assert not (folder / "0_excluded").exists()


def _configure_and_start(page, url: str, stages: Stages) -> None:
    page.goto(url)
    expect(page.get_by_role("tab", name="Configure", selected=True)).to_be_visible(timeout=STEP_TIMEOUT_MS)
    # The form opens on the quick-start preset. A text field's name is its label and help text; the
    # "path" fields are the model's, then the dataset's (schema order).
    paths = page.get_by_role("textbox", name=re.compile(r"^path "))
    expect(paths).to_have_count(2, timeout=STEP_TIMEOUT_MS)
    expect(paths.nth(1)).to_have_value(re.compile("datasets_example"), timeout=STEP_TIMEOUT_MS)
    stages.snap("configure")

    page.get_by_role("button", name=re.compile(r"^Training\b")).click()  # a closed section ("Training ▼")
    max_steps = page.get_by_label("max_steps", exact=True)
    max_steps.fill(str(MAX_STEPS))
    max_steps.press("Tab")
    expect(max_steps).to_have_value(str(MAX_STEPS))
    stages.snap("max-steps")

    page.get_by_role("button", name="Start", exact=True).click()
    run_tab = page.get_by_role("tab", name="Run", selected=True)
    refused = page.get_by_text("Please fix:")
    expect(run_tab.or_(refused).first).to_be_visible(timeout=STEP_TIMEOUT_MS)
    if refused.is_visible():
        stages.snap("start-refused")
        problems = page.locator("li").filter(has=page.locator("code")).all_inner_texts()
        pytest.fail(f"Start refused the unchanged quick-start form: {problems}")


def _status(page, run_name: str):
    """The Run tab's status markdown: a heading with the run's name, then state, step, epoch, loss."""
    return page.get_by_test_id("markdown").filter(has=page.get_by_role("heading", name=run_name, exact=True))


def _watch_the_run(page, runs_dir: Path, stages: Stages) -> str:
    run_dropdown = page.get_by_label("Run", exact=True)
    # the picker shows each run as "name · kind rank · date"
    expect(run_dropdown).to_have_value(re.compile(r"^quickstart-dora-\d{8}-\d{6} · "), timeout=STEP_TIMEOUT_MS)
    run_name = run_dropdown.input_value().split(" · ")[0]
    expect(run_dropdown).to_have_value(re.compile(r" · dora r16 · "), timeout=STEP_TIMEOUT_MS)
    assert [p.name for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] == [run_name]
    assert re.search(rf"(?m)^max_steps = {MAX_STEPS}$", (runs_dir / run_name / "preset.toml").read_text())
    stages.snap("run-started")

    # Polled every 2 s from the run folder: at least two steps, their loss points, the base-model samples.
    expect(_status(page, run_name)).to_contain_text(
        re.compile(rf"step ([2-9]|1\d) / {MAX_STEPS}"), timeout=PROGRESS_S * 1000
    )
    loss_line = page.locator(".vega-embed g.mark-line path").first
    expect(loss_line).to_have_attribute("d", re.compile(r"^M[^M]*L"), timeout=STEP_TIMEOUT_MS)  # 2+ points
    expect(loss_line).to_have_attribute("stroke", re.compile(r"^#"), timeout=STEP_TIMEOUT_MS)  # and visible
    sample = page.locator("img[alt^='base model · 0: ']")
    expect(sample).to_be_attached(timeout=STEP_TIMEOUT_MS)
    sample.scroll_into_view_if_needed()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=sample.element_handle(), timeout=STEP_TIMEOUT_MS
    )
    stages.snap("run-progress")
    return run_name


def _reload_mid_run(page, run_name: str, stages: Stages) -> None:
    """A reloaded page finds the run again in the runs folder (the UI keeps no per-tab state)."""
    stages.collect_errors("before reload")
    page.reload()
    page.get_by_role("tab", name="Run").click()
    expect(page.get_by_label("Run", exact=True)).to_have_value(
        re.compile(f"^{re.escape(run_name)} · "), timeout=STEP_TIMEOUT_MS
    )
    status = _status(page, run_name)
    expect(status).to_contain_text(re.compile(rf"step \d+ / {MAX_STEPS}"), timeout=STEP_TIMEOUT_MS)
    if "finished" in status.inner_text():
        print(f"note: {run_name} had already finished when the page reloaded; the reload checked a done run")
    stages.snap("reloaded")


def _wait_until_finished(page, run_name: str, runs_dir: Path, stages: Stages) -> None:
    status = _status(page, run_name)
    expect(status).to_contain_text("finished", timeout=FINISH_S * 1000)
    expect(status).to_contain_text(f"step {MAX_STEPS} / {MAX_STEPS}")
    # The run ends mid-epoch, so it draws its final samples (one per quick-start prompt) at step 12.
    prompts = len(load_config(ROOT / "presets" / "quickstart.toml").sampling.prompts)
    expect(page.locator(f"img[alt^='step {MAX_STEPS} · ']")).to_have_count(prompts, timeout=STEP_TIMEOUT_MS)
    assert (runs_dir / run_name / "samples" / f"step_{MAX_STEPS:06d}").is_dir()
    stages.snap("finished")


def _compare(page, runs_dir: Path, run_name: str, stages: Stages) -> None:
    """Two runs side by side: the finished one and a copy of it said to be rank 8 (no second training)."""
    copy = runs_dir / f"{run_name}-r8"
    shutil.copytree(runs_dir / run_name, copy)
    config = copy / "config.toml"
    config.write_text(re.sub(r"(?m)^rank = \d+$", "rank = 8", config.read_text(encoding="utf-8")), encoding="utf-8")
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Refresh the list of runs").click()
    runs = page.get_by_label("Runs to compare")
    for name in (run_name, copy.name):
        runs.click()
        page.get_by_role("option", name=name, exact=True).click()
    expect(page.get_by_text("1 setting differs.")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    # the chart's lines are drawn, and in colour (an empty first frame once left them without a stroke)
    chart = page.get_by_role("tabpanel").locator(".vega-embed g.mark-line path")  # the shown tab's only
    expect(chart.first).to_have_attribute("d", re.compile(r"^M[^M]*L"), timeout=STEP_TIMEOUT_MS)
    expect(chart.first).to_have_attribute("stroke", re.compile(r"^#"), timeout=STEP_TIMEOUT_MS)
    # the first prompt at the newest sampling both runs have: the final samples at step 12, one per run
    expect(page.locator(f"img[alt$=' · step {MAX_STEPS}']")).to_have_count(2, timeout=STEP_TIMEOUT_MS)
    stages.snap("compare")


def _export(page, run_dir: Path, tmp_path: Path, stages: Stages) -> None:
    page.get_by_role("tab", name="Export").click()
    # the finished run's final adapter is chosen already: nothing to pick before Download
    expect(page.get_by_label("Adapter", exact=True)).to_have_value(ADAPTER, timeout=STEP_TIMEOUT_MS)
    # the quick start adapts attention and convolutions: SDXL's 722 attention Linears and 66 conv layers
    expect(page.get_by_text("788 adapted layers")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    # The button with the word, not the code boxes' download icons (named "Download" too).
    download_button = page.get_by_role("button", name="Download", exact=True).filter(has_text="Download")
    expect(download_button).to_be_visible(timeout=STEP_TIMEOUT_MS)
    stages.snap("export")

    with page.expect_download(timeout=STEP_TIMEOUT_MS) as download_info:
        download_button.click()
    download = download_info.value
    saved = tmp_path / "downloaded" / download.suggested_filename
    download.save_as(saved)
    assert saved.name == ADAPTER
    assert saved.read_bytes() == (run_dir / "adapters" / ADAPTER).read_bytes()

    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "inspect", str(saved), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["stems"] == 788
    assert set(summary["parts"]) == {"unet"}
    assert all(kind.startswith("dora-") for kind in summary["parts"]["unet"]["kinds"]), summary["parts"]
    _resize(page, run_dir, stages)


def _resize(page, run_dir: Path, stages: Stages) -> None:
    """Resize the adapter to rank 4 from the tab: the report on the page, the new file in exports/ to download."""
    page.get_by_label("rank (to resize to; optional to convert to LoRA)").fill("4")
    page.get_by_role("button", name="Make", exact=True).click()
    expect(page.get_by_text("layers cut; ranks 4-4").first).to_be_visible(timeout=STEP_TIMEOUT_MS)
    made_button = page.get_by_role("button", name="Download the new file")
    expect(made_button).to_be_visible(timeout=STEP_TIMEOUT_MS)
    with page.expect_download(timeout=STEP_TIMEOUT_MS) as download_info:
        made_button.click()
    made = run_dir / "exports" / ADAPTER.replace(".safetensors", "-r4.safetensors")
    assert download_info.value.suggested_filename == made.name and made.is_file()
    stages.snap("resized")
