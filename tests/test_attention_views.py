"""A tiny attention run, seen every way: `captioner train --decoder attention` on the synthetic
dataset (a random-weight MobileNetV3Small's 7x7 grid, extracted by the pipeline), then
`evaluate`, `caption --attention`, `plot --run` and the web page (AppTest here; a real browser in
tests/browser/test_page.py, which reuses `attention_run`).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from captioner import app, attention_maps
from captioner.attention_maps import ALL_WORDS
from captioner.cli import main

SETTINGS = {
    "demo.train_images": 40,
    "demo.dev_images": 10,
    "demo.test_images": 4,
    "demo.image_size": 64,
    "features.image_size": 224,  # not the demo's 112: MobileNetV3Small's 7x7 grid
    "features.precision": "float32",
    "features.dtype": "float32",  # random MobileNet's values (~1e-9) are zeros in float16
    "model.units": 16,
    "model.embed_dim": 8,
    "model.attention_units": 8,
    "model.normalize_features": "true",  # ... and standardised they are fine
    "tokenizer.min_count": 2,
    "train.learning_rate": 0.01,
    "train.dev_scores": 0,
    "decode.beam": 2,
}

pytestmark = pytest.mark.slow  # every test here needs the trained run (~1 min once per session)


@functools.cache
def train_attention_run(root: Path) -> Path:
    """runs/tiny-attention under `root`, trained for 2 epochs (data in root/data)."""
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "demo", "--data-dir", str(root / "data")]
        + ["--encoder", "mobilenetv3small", "--weights", "none", "--decoder", "attention"]
        + ["--epochs", "2", "--name", "tiny-attention"]
        + [f"--set={key}={value}" for key, value in SETTINGS.items()]
        + [f"--set=train.runs_dir={root / 'runs'}"],
    )
    assert result.exit_code == 0, result.output
    assert "features 7x7 grid of 576-d" in result.stderr
    return root / "runs" / "tiny-attention"


@pytest.fixture(scope="session")
def attention_run(tmp_path_factory) -> Path:
    return train_attention_run(tmp_path_factory.getbasetemp() / "attention-run")


def split_images(run: Path) -> list[Path]:
    folder = run.parents[1] / "data" / "demo" / "raw" / "Flicker8k_Dataset"
    return sorted(folder.glob("*.jpg"))[-SETTINGS["demo.test_images"] :]  # the last: test split


def test_evaluate_then_caption_attention_draws_each_test_image(attention_run, tmp_path):
    scored = CliRunner().invoke(main, ["evaluate", "--run", str(attention_run)])
    assert scored.exit_code == 0, scored.output
    predictions = pd.read_csv(next(attention_run.glob("predictions-test-*.csv")), dtype=str)
    images = split_images(attention_run)
    assert sorted(predictions["image"]) == [p.name for p in images]

    out = tmp_path / "maps"
    result = CliRunner().invoke(
        main, ["caption", *map(str, images), "--model", str(attention_run), "--attention", str(out)]
    )
    assert result.exit_code == 0, result.output
    # the captions are evaluate's: the run's encoder made the grid the cache holds
    captioned = dict(line.split("\t")[::2] for line in result.stdout.splitlines())
    expected = dict(zip(predictions["image"], predictions["caption"].fillna(""), strict=True))
    assert {Path(path).name: caption for path, caption in captioned.items()} == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)
    assert f"{len(images)} attention figures in {out}" in result.stderr
    for png in out.iterdir():
        with Image.open(png) as figure:
            assert figure.format == "PNG" and figure.height > 200
            assert np.asarray(figure.convert("L")).std() > 5  # not blank
    longest = max(expected.values(), key=lambda caption: len(caption.split()))
    shortest = min(expected.values(), key=lambda caption: len(caption.split()))
    if len(longest.split()) // 6 > len(shortest.split()) // 6:  # more rows of 6 panels
        sizes = {
            caption: Image.open(out / f"{Path(p).stem}.png").height
            for p, caption in captioned.items()
        }
        assert sizes[longest] > sizes[shortest]


def test_caption_attention_with_two_attention_runs_gives_each_its_folder(attention_run, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(attention_run, twin)
    image = split_images(attention_run)[0]
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        main,
        ["caption", str(image), "--model", str(attention_run), "--model", str(twin)]
        + ["--attention", str(out), "--beam", "1"],
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    figures = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert figures == sorted(Path(name, f"{image.stem}.png") for name in ("tiny-attention", "twin"))


def test_plot_adds_a_page_of_attention_examples(attention_run, tmp_path):
    data = attention_run.parents[1] / "data"
    result = CliRunner().invoke(
        main,
        ["plot", "--dataset", "demo", "--data-dir", str(data), "--run", str(attention_run)]
        + ["--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "attention.png") in result.stdout.splitlines()
    with Image.open(tmp_path / "attention.png") as page:
        # a row per test image: the image and one panel per word (tiny runs write short captions)
        assert page.width > 300 and page.height > 400


def test_plot_of_a_merge_run_skips_the_attention_page(attention_run, tmp_path):
    merge = tmp_path / "merge-run"
    merge.mkdir()
    config = json.loads((attention_run / "config.json").read_text())
    config["model"]["decoder"] = "merge"
    (merge / "config.json").write_text(json.dumps(config))
    data = attention_run.parents[1] / "data"
    result = CliRunner().invoke(
        main,
        ["plot", "--dataset", "demo", "--data-dir", str(data), "--run", str(merge)]
        + ["--out", str(tmp_path / "plots")],
    )
    assert result.exit_code == 0, result.output
    assert f"skipping attention.png: {merge} is a merge run: no attention maps" in result.stderr
    assert not (tmp_path / "plots" / "attention.png").exists()


def test_page_shows_the_map_of_the_word_picked_or_of_all(attention_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from captioner.caption import load_run

    image = split_images(attention_run)[0]
    run = load_run(attention_run)
    caption = run.caption_files([image], run.decode_settings())[0][0][1]
    words = caption.split()
    assert words, "the tiny run wrote an empty caption: nothing to look at"

    monkeypatch.setenv(app.MODELS_ENV, json.dumps([str(attention_run)]))
    page = AppTest.from_file(str(Path(app.__file__)), default_timeout=120)
    page.run()
    page.file_uploader[0].set_value((image.name, image.read_bytes(), "image/jpeg"))
    page.run()
    assert not page.exception and not page.error
    assert app.caption_markdown(caption) in [m.value for m in page.markdown]
    picker = page.selectbox(key=f"attention:{app.model_name(attention_run)}:{caption}")
    assert picker.options == [ALL_WORDS] + [f"{n}. {w}" for n, w in enumerate(words, 1)]
    assert picker.value == ALL_WORDS
    assert len(page.image) == 2  # the uploaded image, and the overlays as one list
    assert page.image[0].captions == [image.name] and page.image[1].captions == words

    calls = []  # the page's captioning, from now on
    real_attend_files = attention_maps.attend_files
    monkeypatch.setattr(
        attention_maps, "attend_files", lambda *a: calls.append(a) or real_attend_files(*a)
    )
    picker.select(f"{len(words)}. {words[-1]}")
    page.run()
    assert not page.exception
    assert page.image[1].captions == [words[-1]]
    assert not calls  # another word's map needs no new caption
