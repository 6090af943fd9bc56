"""The web page's logic with Streamlit's AppTest (no browser), on two tiny random-weight runs.

`make_run` builds a run directory as `captioner train` leaves it (config.json, vocab.json from
Flickr8k-layout captions, features_meta.json naming a random-weight MobileNetV3Small, model.keras,
state.json); tests/browser/ reuses it.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner import app
from captioner.cli import main
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.io import write_json
from captioner.text import normalize
from captioner.tokenizer import Vocabulary

APP_FILE = Path(app.__file__)
FIXTURE_IMAGES = ["demo_00000.jpg", "demo_00001.jpg"]  # of the flickr8k_like folder
ENCODER = {"encoder": "mobilenetv3small", "weights": "none", "dim": 576}


def make_run(run_dir: Path, dataset: str, fixtures: Path, seed: int) -> Path:
    """A finished run with random weights: real vocabulary, tiny model, no training."""
    import keras

    from captioner.models.merge import build_model

    keras.utils.set_random_seed(seed)
    cfg = load_config(
        None,
        (),
        dataset=dataset,
        **{
            "seed": seed,
            "features.encoder": ENCODER["encoder"],
            "features.weights": "none",
            "model.units": 16,
            "model.embed_dim": 16,
            "model.normalize_features": False,
            "decode.beam": 3,
            "train.name": run_dir.name,
        },
    )
    lines = (fixtures / "Flickr8k_text" / "Flickr8k.token.txt").read_text("utf-8").splitlines()
    vocab = Vocabulary.from_captions(
        [normalize(line.split("\t")[1]) for line in lines[:200]], max_length=8
    )
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "vocab.json", vocab.to_json())
    write_json(
        run_dir / "features_meta.json",
        {**ENCODER, "seed": 0, "count": 0, "dtype": "float32", "precision": "float32"},
    )
    build_model(ENCODER["dim"], vocab.size, cfg.model).save(run_dir / "model.keras")
    (run_dir / "history.csv").write_text("epoch,loss,val_loss\n1,5.0,5.1\n")
    write_json(
        run_dir / "state.json", {"epoch": 1, "epochs": 1, "finished": True, "best_val_loss": 5.1}
    )
    return run_dir


@functools.cache
def built_runs(root: Path, fixtures: Path) -> tuple[Path, ...]:
    """Two runs named like the two models the page compares (built once per test session)."""
    return (
        make_run(root / "f30k", "flickr30k", fixtures, seed=1),
        make_run(root / "f8k", "flickr8k", fixtures, seed=2),
    )


@functools.cache
def captions_of(runs: tuple[Path, ...], image: Path) -> dict[tuple[str, int], str]:
    """What caption.load_run says for the image: {(run name, beam): caption}."""
    from captioner import caption

    result = {}  # both runs use the same encoder, as runs on one cache do
    for run in runs:
        loaded = caption.load_run(run)
        for beam in (1, 3):
            captions, failures = loaded.caption_files([image], loaded.decode_settings(beam))
            assert not failures
            result[(run.name, beam)] = captions[0][1]
    return result


# Fixtures shared with tests/browser/ (its conftest imports them); the caches above make both
# directories use one set of runs.
@pytest.fixture(scope="session")
def runs(tmp_path_factory, flickr8k_like) -> list[Path]:
    return list(built_runs(tmp_path_factory.getbasetemp() / "app-runs", flickr8k_like))


@pytest.fixture(scope="session")
def expected(runs, flickr8k_like) -> dict[tuple[str, int], str]:
    return captions_of(tuple(runs), flickr8k_like / "Flicker8k_Dataset" / FIXTURE_IMAGES[0])


@pytest.fixture
def page(runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(app.MODELS_ENV, json.dumps([str(r) for r in runs]))
    return AppTest.from_file(str(APP_FILE), default_timeout=120)


def upload(page, path: Path) -> None:
    page.file_uploader[0].set_value((path.name, path.read_bytes(), "image/jpeg"))


# --- plain functions -------------------------------------------------------------------------


def test_model_name_reads_dataset_and_encoder(runs):
    assert app.model_name(runs[0]) == "f30k (flickr30k, mobilenetv3small)"
    assert app.model_name(Path("/nowhere/run-x")) == "run-x"


def test_run_dirs_come_from_the_environment(runs, tmp_path):
    env = app.app_environment(runs, examples=tmp_path, base={"PATH": "/bin"})
    assert env["PATH"] == "/bin" and env[app.EXAMPLES_ENV] == str(tmp_path.resolve())
    assert app.run_dirs_from_env(env) == [r.resolve() for r in runs]
    with pytest.raises(CaptionerError, match="names no run directories"):
        app.run_dirs_from_env({app.MODELS_ENV: "not json"})
    with pytest.raises(CaptionerError, match="not a trained run"):
        app.app_environment([tmp_path])
    with pytest.raises(CaptionerError, match="no model given"):
        app.app_environment([])


def test_streamlit_command_serves_this_page_headless():
    command = app.streamlit_command("127.0.0.1", 8765)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4] == str(APP_FILE.resolve())
    assert "127.0.0.1" in command and "8765" in command and "true" in command


def test_open_image_rejects_non_images_with_a_readable_message(flickr8k_like, monkeypatch):
    with pytest.raises(CaptionerError, match=r"^notes\.png: not a readable image .*; upload a "):
        app.open_image(b"hello, not an image", "notes.png")
    photo = (flickr8k_like / "Flicker8k_Dataset" / FIXTURE_IMAGES[0]).read_bytes()
    assert app.open_image(photo, "photo.jpg").mode == "RGB"
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 1000)  # the photo now counts as a bomb
    with pytest.raises(CaptionerError, match=r"^photo\.jpg: not a readable image"):
        app.open_image(photo, "photo.jpg")


def test_example_images_from_a_folder(flickr8k_like, runs):
    folder = flickr8k_like / "Flicker8k_Dataset"
    examples = app.example_images(runs, str(folder), limit=3)
    assert [p.name for p in examples] == sorted(p.name for p in folder.glob("*.jpg"))[:3]
    assert app.example_images(runs) == []  # the tiny runs' datasets have no captions.csv here


def test_example_images_default_to_the_runs_test_split(tmp_path, tiny_config, flickr8k_like):
    import pandas as pd

    cfg = tiny_config("mine")
    write_json(tmp_path / "run" / "config.json", cfg.to_dict())
    folder = flickr8k_like / "Flicker8k_Dataset"
    names = sorted(p.name for p in folder.glob("*.jpg"))[:3] + ["missing.jpg"]
    cfg.dataset_dir.mkdir(parents=True)
    pd.DataFrame(
        {
            "image": names,
            "split": ["train", "test", "test", "test"],
            "caption": "a dog",
            "raw": "A dog .",
        }
    ).to_csv(cfg.captions_csv, index=False)
    write_json(cfg.dataset_dir / "captions.json", {"images_dir": str(folder)})
    assert app.example_images([tmp_path / "run"]) == [folder / names[1], folder / names[2]]


def test_app_command_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["app", "--model", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path}: not a trained run (no model.keras); "
        "pass a folder made by `captioner train`"
    )


# --- the page (AppTest) ----------------------------------------------------------------------


@pytest.mark.slow
def test_page_shows_every_models_caption_side_by_side(
    page, runs, expected, flickr8k_like, monkeypatch
):
    import streamlit as st

    from captioner import loaded_run

    loads = []
    real_load_run = loaded_run.load_run

    def counting_load_run(*args, **kwargs):
        loads.append(args)
        return real_load_run(*args, **kwargs)

    monkeypatch.setattr(loaded_run, "load_run", counting_load_run)
    st.cache_resource.clear()  # earlier tests may have loaded these runs already
    page.run()
    assert not page.exception and not page.error
    assert "Upload an image" in page.info[0].value
    upload(page, flickr8k_like / "Flicker8k_Dataset" / FIXTURE_IMAGES[0])
    page.run()
    assert not page.exception and not page.error
    assert [h.value for h in page.subheader] == [app.model_name(r) for r in runs]
    shown = [m.value for m in page.markdown]
    for run in runs:
        assert app.caption_markdown(expected[(run.name, 3)]) in shown  # beam 3 by default
    timings = [c.value for c in page.caption]
    assert len([t for t in timings if t.startswith("beam 3, ") and t.endswith(" s")]) == 2

    upload(page, flickr8k_like / "Flicker8k_Dataset" / FIXTURE_IMAGES[1])
    page.run()
    assert not page.exception and len(page.subheader) == 2
    assert len(loads) == len(runs)  # models load once, not per upload


@pytest.mark.slow
def test_page_greedy_choice_gives_greedy_captions(page, runs, expected, flickr8k_like):
    page.run()
    page.sidebar.radio[0].set_value("greedy")
    upload(page, flickr8k_like / "Flicker8k_Dataset" / FIXTURE_IMAGES[0])
    page.run()
    assert not page.exception and not page.sidebar.slider  # no beam width for greedy
    shown = [m.value for m in page.markdown]
    assert all(app.caption_markdown(expected[(run.name, 1)]) in shown for run in runs)
    assert all(c.value.startswith("greedy, ") for c in page.caption if c.value.endswith(" s"))


@pytest.mark.slow
def test_page_bad_upload_is_a_message_not_a_traceback(page):
    page.run()
    page.file_uploader[0].set_value(("holiday.jpg", b"\x00 not a jpeg", "image/jpeg"))
    page.run()
    assert not page.exception
    assert page.error[0].value.startswith("holiday.jpg: not a readable image")
    assert not page.subheader  # no model output for a bad file


@pytest.mark.slow
def test_page_example_picker(page, flickr8k_like, monkeypatch):
    monkeypatch.setenv(app.EXAMPLES_ENV, str(flickr8k_like / "Flicker8k_Dataset"))
    page.run()
    picker = page.selectbox[0]
    assert len(picker.options) == app.MAX_EXAMPLES
    picker.select_index(1)
    page.run()
    assert not page.exception and not page.error
    assert len(page.image) == 1  # the chosen image is shown
    assert len(page.subheader) == 2


def test_page_without_models_explains_how_to_start(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv(app.MODELS_ENV, raising=False)
    page = AppTest.from_file(str(APP_FILE), default_timeout=60)
    page.run()
    assert not page.exception
    assert "captioner app --model runs/NAME" in page.error[0].value


def test_missing_extra_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    import captioner

    monkeypatch.setitem(sys.modules, "streamlit", None)  # import streamlit now raises ImportError
    monkeypatch.delitem(sys.modules, "captioner.app")
    monkeypatch.delattr(captioner, "app")  # else `from captioner import app` reuses the module
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("streamlit was started"))
    result = CliRunner().invoke(main, ["app", "--model", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == "Error: the web app needs streamlit; pip install 'captioner[app]'\n"
