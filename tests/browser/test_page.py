"""The web page in a real browser: `streamlit run` on 127.0.0.1, Debian's chromium via Playwright.

Uploads a real Flickr8k image and waits for every model's caption (the one caption.load_run gives
for that image) to appear; the screenshot is kept in test-artifacts/app.png. Skips, saying why,
when chromium or playwright is missing (CI installs them: see the README's development notes).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from captioner import app

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: apt-get install -y chromium"
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


@pytest.fixture
def server(runs, tmp_path):
    """The page served exactly as `captioner app` serves it, on a free local port."""
    port = free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    process = subprocess.Popen(
        app.streamlit_command("127.0.0.1", port),
        env=app.app_environment(runs),
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()  # only the process this fixture started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_upload_shows_every_models_caption(server, runs, expected, flickr8k_like):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    image = flickr8k_like / "Flicker8k_Dataset" / "demo_00000.jpg"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            uploader = page.locator("input[type=file]")
            uploader.wait_for(state="attached", timeout=120_000)  # appears once models loaded
            uploader.set_input_files(image)
            for run in runs:
                # The page's default is the runs' own decoding: beam search with width 3. A
                # random-weight model may end at once; the page says so instead of a caption.
                shown = expected[(run.name, 3)] or "(empty caption: the model ended at once)"
                page.get_by_text(shown, exact=True).first.wait_for(timeout=90_000)
                page.get_by_text(app.model_name(run), exact=True).wait_for(timeout=5_000)
            page.screenshot(path=ARTIFACTS / "app.png", full_page=True)
            assert page.get_by_text("beam 3, ").count() == len(runs)
            assert page.locator("[data-testid=stException]").count() == 0
        finally:
            browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
