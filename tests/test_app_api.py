"""The studio through its named API (gradio_client), its doors (auth, file paths, names) and its processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from app.launcher import start_run
from app.runs import read_status
from trainer.config.presets import config_from_text
from trainer.errors import LaunchRefused

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "presets"
# the quick start, long enough to be caught running; no sampling, to keep the CPU for training
LONG_RUN = """base = "quickstart.toml"
[training]
epochs = 20
max_steps = 400
[sampling]
prompts = []
at_start = false
"""


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """One DORA_STUDIO_CACHE for every trainer these tests spawn (builtin:tiny-sdxl is built once)."""
    return tmp_path_factory.mktemp("studio-cache")


@pytest.fixture()
def trainer_env(model_cache, monkeypatch):
    monkeypatch.setenv("DORA_STUDIO_CACHE", str(model_cache))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_trainers(runs_dir: Path) -> None:
    """Never leave a trainer behind, whatever a test did."""
    for status_file in runs_dir.glob("*/status.json"):
        pid = json.loads(status_file.read_text()).get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture()
def studio(tmp_path, trainer_env):
    from app.serve import launch

    runs_dir = tmp_path / "runs"
    port = free_port()
    demo = launch(runs_dir, port=port, block=False)
    try:
        yield runs_dir, f"http://127.0.0.1:{port}"
    finally:
        demo.close()
        kill_trainers(runs_dir)


def test_api_start_watch_refuse_second_and_stop(studio):
    runs_dir, url = studio
    client = Client(url, verbose=False)
    name = client.predict(LONG_RUN, api_name="/start_run")
    status = wait_for(
        lambda: (s := client.predict(name, api_name="/run_status"))["step"] >= 2 and s, 120, "two training steps"
    )
    assert status["state"] in ("training", "saving") and status["total_steps"] == 400 and status["alive"]

    with pytest.raises(Exception, match="one run trains at a time"):
        client.predict(LONG_RUN, api_name="/start_run")
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == [name]

    assert client.predict(name, api_name="/stop_run") == "stopping"
    wait_for(lambda: client.predict(name, api_name="/run_status")["state"] == "stopped", 120, "the stop")
    step = client.predict(name, api_name="/run_status")["step"]
    assert (runs_dir / name / f"adapters/quickstart-dora-step{step:06d}.safetensors").is_file()


def test_bad_input_reaches_the_caller_as_a_message(studio):
    _, url = studio
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="network.rnak: unknown setting; did you mean network.rank"):
        client.predict('base = "quickstart.toml"\n[network]\nrnak = 4\n', api_name="/start_run")
    for bad_name in ("../etc", "/etc/passwd", "a/b", ".hidden"):
        with pytest.raises(Exception, match="run name"):
            client.predict(bad_name, api_name="/run_status")


def test_two_concurrent_starts_start_one_run(tmp_path, trainer_env):
    runs_dir = tmp_path / "runs"
    config = config_from_text(LONG_RUN, PRESETS)
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def press_start():
        barrier.wait()
        try:
            outcomes.append(start_run(runs_dir, config))
        except LaunchRefused as error:
            outcomes.append(error)

    threads = [threading.Thread(target=press_start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        names = [o for o in outcomes if isinstance(o, str)]
        refusals = [o for o in outcomes if isinstance(o, LaunchRefused)]
        assert len(names) == 1 and len(refusals) == 1, outcomes
        assert "one run trains at a time" in str(refusals[0])
        assert read_status(runs_dir / names[0]).alive
    finally:
        kill_trainers(runs_dir)


def test_auth_guards_pages_files_and_api(tmp_path, trainer_env):
    from app.serve import launch

    runs_dir = tmp_path / "runs"
    (runs_dir / "r1" / "adapters").mkdir(parents=True)
    secret = runs_dir / "r1" / "adapters" / "a.safetensors"
    secret.write_bytes(b"weights")
    port = free_port()
    demo = launch(runs_dir, port=port, auth=("ann", "s3cret"), block=False)
    url = f"http://127.0.0.1:{port}"
    try:
        file_url = f"{url}/gradio_api/file={secret}"
        assert httpx.get(file_url).status_code == 401
        assert httpx.get(f"{url}/config").status_code == 401
        assert httpx.get(f"{url}/gradio_api/info").status_code == 401
        with pytest.raises(Exception):  # noqa: B017 (whatever the client raises: it must not get in)
            Client(url, verbose=False)
        with httpx.Client() as browser:
            assert browser.post(f"{url}/login", data={"username": "ann", "password": "nope"}).status_code != 200
            assert browser.post(f"{url}/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert browser.get(file_url).content == b"weights"
        client = Client(url, auth=("ann", "s3cret"), verbose=False)
        assert client.predict("r1", api_name="/run_status")["name"] == "r1"
    finally:
        demo.close()


def test_files_outside_the_runs_folder_are_refused(studio, tmp_path):
    runs_dir, url = studio
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (runs_dir / "r1").mkdir(parents=True)
    (runs_dir / "r1" / "link.txt").symlink_to(outside)
    (runs_dir / "r1" / "ok.txt").write_text("fine")
    assert httpx.get(f"{url}/gradio_api/file={runs_dir / 'r1' / 'ok.txt'}").text == "fine"
    for path in (str(outside), "/etc/passwd", f"{runs_dir}/../outside.txt", str(runs_dir / "r1" / "link.txt")):
        response = httpx.get(f"{url}/gradio_api/file={path}")
        assert response.status_code == 403, path
        assert "private" not in response.text


def _ui_process(runs_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "ui", "--runs-dir", str(runs_dir), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _client_when_up(port: int) -> Client:
    def connect():
        try:
            return Client(f"http://127.0.0.1:{port}", verbose=False)
        except Exception:
            return None

    return wait_for(connect, 90, "the UI to answer")


def test_killing_the_ui_does_not_stop_training_and_a_new_ui_reattaches(tmp_path, trainer_env):
    runs_dir = tmp_path / "runs"
    first = _ui_process(runs_dir, port := free_port())
    second = None
    try:
        name = _client_when_up(port).predict(LONG_RUN, api_name="/start_run")
        wait_for(lambda: read_status(runs_dir / name).step >= 2, 120, "training to start")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        step_at_kill = read_status(runs_dir / name).step
        wait_for(lambda: read_status(runs_dir / name).step >= step_at_kill + 3, 60, "training to go on")

        second = _ui_process(runs_dir, port := free_port())
        client = _client_when_up(port)
        status = client.predict(name, api_name="/run_status")
        assert status["alive"] and status["state"] == "training"
        client.predict(name, api_name="/stop_run")
        wait_for(lambda: client.predict(name, api_name="/run_status")["state"] == "stopped", 120, "the stop")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        kill_trainers(runs_dir)
