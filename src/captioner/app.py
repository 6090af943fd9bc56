"""The web page: caption an uploaded or example image with one or more trained runs, side by side;
for a run with attention, also where each word of its caption looked (the word the user picks,
or all of them).

`captioner app --model runs/A --model runs/B` calls `launch`, which starts `streamlit run` on this
file with the run directories in the CAPTIONER_APP_MODELS environment variable (a JSON list).
The page function at the bottom stays thin; what it calls are plain functions, tested without a
browser (tests/test_app.py) and through one (tests/browser/).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from captioner.attention_maps import Attended, attend_files, word_choices, word_overlays
from captioner.errors import CaptionerError
from captioner.formats import IMAGE_SUFFIXES, is_image_name

try:  # the optional extra: one readable line instead of an ImportError traceback
    import streamlit as st
except ImportError:
    raise CaptionerError("the web app needs streamlit; pip install 'captioner[app]'") from None

MODELS_ENV = "CAPTIONER_APP_MODELS"  # JSON list of run directories
EXAMPLES_ENV = "CAPTIONER_APP_EXAMPLES"  # optional folder of example images
IMAGE_TYPES = [suffix[1:] for suffix in IMAGE_SUFFIXES]  # as Streamlit's uploader wants them
MAX_EXAMPLES = 12
BEAM_WIDTHS = (2, 10)  # the sidebar's slider


@dataclass(frozen=True)
class Result:
    """One model's answer for one image: a caption (with where each word looked, for a model
    with attention), or the reason there is none."""

    model: str
    caption: str
    error: str
    seconds: float
    attended: Attended | None = None  # the caption's words and maps (maps None: no attention)

    @property
    def maps(self) -> bool:
        return self.attended is not None and self.attended.maps is not None


# --- launching -----------------------------------------------------------------------------


def check_run_dir(run_dir: Path) -> Path:
    """The run directory if it holds a trained model, else a CaptionerError naming the fix."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.keras").is_file():
        raise CaptionerError(
            f"{run_dir}: not a trained run (no model.keras); "
            "pass a folder made by `captioner train`"
        )
    return run_dir


def app_environment(
    run_dirs: Sequence[Path], examples: Path | None = None, base: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment that tells the page which runs (and example folder) to use."""
    if not run_dirs:
        raise CaptionerError("no model given; pass --model runs/NAME (repeatable)")
    env = dict(base)
    env[MODELS_ENV] = json.dumps([str(check_run_dir(r).resolve()) for r in run_dirs])
    if examples is not None:
        env[EXAMPLES_ENV] = str(Path(examples).resolve())
    return env


def streamlit_command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """`streamlit run` on this file, headless, without usage statistics."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(Path(__file__).resolve()),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]


def launch(
    run_dirs: Sequence[Path],
    examples: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8501,
) -> int:
    """Serve the page until interrupted; returns streamlit's exit code."""
    env = app_environment(run_dirs, examples)
    return run_child(streamlit_command(host, port), env)


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run `command` until it exits, passing on SIGTERM, SIGINT and SIGHUP, so stopping us stops
    it too (never an orphan still serving); returns its exit code, 128 + N if signal N ended it."""
    child = subprocess.Popen(list(command), env=env)

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # we are leaving for another reason: take the child along
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    return 128 - code if code < 0 else code


# --- page logic ----------------------------------------------------------------------------


def run_dirs_from_env(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """The run directories passed by `launch` (or by a test) through CAPTIONER_APP_MODELS."""
    text = environ.get(MODELS_ENV, "")
    try:
        dirs = json.loads(text) if text else []
    except json.JSONDecodeError:
        dirs = None
    if not isinstance(dirs, list) or not dirs:
        raise CaptionerError(
            f"{MODELS_ENV} names no run directories; start the page with "
            "`captioner app --model runs/NAME`"
        )
    return [check_run_dir(Path(d)) for d in dirs]


def model_name(run_dir: Path) -> str:
    """'<run name> (<dataset>, <encoder>)' from the run's config.json, or just the folder name."""
    from captioner.runs import read_run

    summary = read_run(Path(run_dir))  # never raises: a damaged config.json leaves fields empty
    if not (summary.dataset and summary.encoder):
        return summary.name
    return f"{summary.name} ({summary.dataset}, {summary.encoder})"


def example_images(
    run_dirs: Sequence[Path], folder: str | None = None, limit: int = MAX_EXAMPLES
) -> list[Path]:
    """Images from `folder`, else the test split of the first run's dataset; [] if none found."""
    from captioner.captions import load_captions
    from captioner.rundir import read_config

    try:
        if folder:
            paths = sorted(p for p in Path(folder).iterdir() if is_image_name(p.name))
            return paths[:limit]
        cfg = read_config(run_dirs[0])
        captions, images_dir = load_captions(cfg)
    except (OSError, ValueError, KeyError, IndexError):  # CaptionerError is a ValueError
        return []  # examples are a convenience: the page works without them
    names = captions.loc[captions["split"] == "test", "image"].drop_duplicates().head(limit)
    return [images_dir / name for name in names if (images_dir / name).is_file()]


def open_image(data: bytes, name: str) -> Image.Image:
    """The uploaded bytes as an RGB image, or a CaptionerError a user can read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise CaptionerError(
            f"{name}: not a readable image ({error}); upload a {', '.join(IMAGE_TYPES)} file"
        ) from None


EMPTY_CAPTION = "(empty caption: the model ended at once)"


def caption_markdown(caption: str) -> str:
    """A caption as bold Markdown text: special characters escaped, an empty one named."""
    if not caption.strip():
        return f"*{EMPTY_CAPTION}*"
    return "**" + re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", caption) + "**"


def caption_image(
    models: Sequence[tuple[str, Any]], data: bytes, name: str, beam: int | None = None
) -> list[Result]:
    """Caption one image with every (name, LoadedRun), each with its run's decoding settings
    (and `beam`, when the page chose one); times each model separately."""
    suffix = Path(name).suffix or ".jpg"
    results = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"  # a safe name: never the user's path
        path.write_bytes(data)
        for model, loaded in models:
            start = time.perf_counter()
            captions, failures = attend_files(loaded, [path], loaded.decode_settings(beam))
            seconds = time.perf_counter() - start
            if captions:
                attended = captions[0][1]
                results.append(Result(model, attended.caption, "", seconds, attended))
            else:
                reason = failures[0][1] if failures else "no caption produced"
                results.append(Result(model, "", f"{name}: {reason}", seconds))
    return results


@st.cache_resource(show_spinner="Loading models (once)...")
def load_models(run_dirs: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(name, LoadedRun) per run, loaded once per server process, not per upload."""
    from captioner import loaded_run

    # runs made with the same encoder share one copy of it (encoders.build_encoder's cache)
    models = [(model_name(Path(d)), loaded_run.load_run(Path(d))) for d in run_dirs]
    # The first call traces TensorFlow functions (seconds); do it now for the runs' own decoding
    # settings (the page's default), so the time shown for a user's image is the real one.
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(blank, format="JPEG")
    caption_image(models, blank.getvalue(), "warm-up.jpg")
    return models


@st.cache_resource(max_entries=4, show_spinner=False)
def page_captions(
    run_dirs: tuple[str, ...], data: bytes, name: str, beam: int, _models: Sequence
) -> list[Result]:
    """caption_image, kept for the last few images and settings: picking another word of the
    caption shows its map at once, without captioning the image again."""
    return caption_image(_models, data, name, beam)


def show_attention(column: Any, image: Image.Image, result: Result) -> None:
    """Beside a caption: a word picker and the map of the picked word (or of every word)."""
    choice = column.selectbox(
        "Where the model looked, word by word",
        word_choices(result.attended),
        key=f"attention:{result.model}:{result.caption}",  # a new caption starts at ALL_WORDS
    )
    pictures = word_overlays(image, result.attended, choice)
    column.image(
        [picture for picture, _ in pictures],
        caption=[word for _, word in pictures],
        width=150 if len(pictures) > 1 else "stretch",
    )


def default_beam(models: Sequence[tuple[str, Any]]) -> int:
    """The page's initial beam width: the first run's own (its config.json's decode.beam)."""
    return models[0][1].decode_settings().beam


# --- the page ------------------------------------------------------------------------------


def page() -> None:
    st.set_page_config(page_title="captioner", layout="wide")
    st.title("captioner")
    st.caption("Caption an image with every trained model, side by side.")
    try:
        run_dirs = run_dirs_from_env()
        models = load_models(tuple(str(d) for d in run_dirs))
    except CaptionerError as error:
        st.error(str(error))
        return

    with st.sidebar:
        run_beam = default_beam(models)
        decoding = st.radio("Decoding", ["greedy", "beam search"], index=int(run_beam > 1))
        low, high = BEAM_WIDTHS
        width = min(max(run_beam, low), high)
        beam = st.slider("Beam width", low, high, width) if decoding == "beam search" else 1
    upload_column, example_column = st.columns(2)
    upload = upload_column.file_uploader("Upload an image", type=IMAGE_TYPES)
    examples = example_images(run_dirs, os.environ.get(EXAMPLES_ENV))
    example = example_column.selectbox(
        "...or pick an example",
        examples,
        index=None,
        format_func=lambda p: p.name,
        placeholder="choose an example image",
    )
    if upload is not None:
        data, name = upload.getvalue(), upload.name
    elif example is not None:
        data, name = example.read_bytes(), example.name
    else:
        st.info("Upload an image or pick an example to see each model's caption.")
        return
    try:
        image = open_image(data, name)
    except CaptionerError as error:
        st.error(str(error))
        return

    image_column, answers = st.columns([1, 2], gap="large")
    image_column.image(image, caption=name, width="stretch")
    with st.spinner("Captioning..."):
        results = page_captions(tuple(str(d) for d in run_dirs), data, name, beam, models)
    for column, result in zip(answers.columns(len(results)), results, strict=True):
        column.subheader(result.model)
        if result.error:
            column.error(result.error)
        else:
            column.markdown(caption_markdown(result.caption))
        column.caption(f"{'greedy' if beam == 1 else f'beam {beam}'}, {result.seconds:.2f} s")
        if result.maps and result.attended.words:
            show_attention(column, image, result)


if __name__ == "__main__":
    page()
