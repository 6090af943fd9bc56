"""The web page in a real browser: `streamlit run` on 127.0.0.1, Debian's chromium via Playwright.

Uploads an image and waits for every model's caption (the one caption.load_run gives for that
image) to appear, and for an attention run for each word's map and then the picked word's; the
screenshots are kept in test-artifacts/app.png and app-attention.png. Skips, saying why,
when chromium or playwright is missing (CI installs them: see the README's development notes).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from processes import stop
from test_attention_views import split_images

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
# n images on the page, each with a caption and each loaded (not a blank box)
SHOWN = """n => {
    const images = [...document.querySelectorAll('[data-testid=stImage] img')];
    return document.querySelectorAll('[data-testid=stImageCaption]').length === n
        && images.length === n && images.every(i => i.complete && i.naturalWidth > 0);
}"""

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


@contextlib.contextmanager
def serving(run_dirs, log_path: Path):
    """The page served exactly as `captioner app` serves it, on a free local port; its URL."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        app.streamlit_command("127.0.0.1", port),
        env=app.app_environment(run_dirs),
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        stop(process, timeout=20)
        log.close()


@pytest.fixture
def server(runs, tmp_path):
    with serving(runs, tmp_path / "streamlit.log") as url:
        yield url


@pytest.fixture
def attention_server(attention_run, tmp_path):
    with serving([attention_run], tmp_path / "streamlit.log") as url:
        yield url


@contextlib.contextmanager
def browser_page():
    """A chromium page (1280 x 1000) driven by Playwright; skips when Playwright is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def upload(page, url: str, image: Path) -> None:
    page.goto(url)
    uploader = page.locator("input[type=file]")
    uploader.wait_for(state="attached", timeout=120_000)  # appears once models loaded
    uploader.set_input_files(image)


def test_upload_shows_every_models_caption(server, runs, expected, flickr8k_like):
    image = flickr8k_like / "Flicker8k_Dataset" / "demo_00000.jpg"
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page() as page:
        upload(page, server, image)
        for run in runs:
            # The page's default is beam search with width 3.
            shown = expected[(run.name, 3)] or app.EMPTY_CAPTION  # as the page names it
            page.get_by_text(shown, exact=True).first.wait_for(timeout=90_000)
            page.get_by_text(app.model_name(run), exact=True).wait_for(timeout=5_000)
        page.screenshot(path=ARTIFACTS / "app.png", full_page=True)
        assert page.get_by_text("beam 3, ").count() == len(runs)
        assert page.locator("[data-testid=stException]").count() == 0
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000


def test_attention_run_shows_where_each_word_looked(attention_server, attention_run):
    """Every word's map under the caption, then the one word picked in the selectbox."""
    from captioner.caption import load_run

    image = split_images(attention_run)[0]
    run = load_run(attention_run)
    words = run.caption_files([image], run.decode_settings())[0][0][1].split()
    assert words, "the tiny run wrote an empty caption: nothing to look at"
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page() as page:
        upload(page, attention_server, image)
        page.get_by_text(" ".join(words), exact=True).wait_for(timeout=90_000)
        captions = page.locator("[data-testid=stImageCaption]")
        page.wait_for_function(SHOWN, arg=1 + len(words), timeout=60_000)  # every word's map
        assert captions.all_inner_texts() == [image.name, *words]
        page.screenshot(path=ARTIFACTS / "app-attention.png", full_page=True)

        page.locator("[data-testid=stSelectbox]").last.click()
        page.get_by_role("option", name=f"{len(words)}. {words[-1]}").click()
        page.wait_for_function(SHOWN, arg=2, timeout=60_000)  # the image and the word's map
        assert captions.all_inner_texts() == [image.name, words[-1]]
        assert page.locator("[data-testid=stException]").count() == 0
