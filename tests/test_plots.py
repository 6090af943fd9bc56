"""plots.py on real Flickr8k captions and images: every PNG is written, readable and not blank."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioner import plot_figures, plots
from captioner.errors import CaptionerError
from captioner.text import normalize


@pytest.fixture(scope="module")
def images_dir(flickr8k_like: Path) -> Path:
    return flickr8k_like / "Flicker8k_Dataset"


@pytest.fixture(scope="module")
def captions(flickr8k_like: Path, images_dir: Path) -> pd.DataFrame:
    """captions.csv rows (image, split, caption, raw) for the first 24 fixture images."""
    names = sorted(p.name for p in images_dir.glob("*.jpg"))[:24]
    rows = []
    token_file = flickr8k_like / "Flickr8k_text" / "Flickr8k.token.txt"
    for line in token_file.read_text(encoding="utf-8").splitlines():
        key, raw = line.split("\t", 1)
        name = key.split("#")[0]
        if name in names:
            split = "test" if names.index(name) >= 20 else "train"
            rows.append({"image": name, "split": split, "caption": normalize(raw), "raw": raw})
    return pd.DataFrame(rows)


def pixel_features(images_dir: Path, names: list[str]) -> np.ndarray:
    """A cheap real image descriptor: each image shrunk to 8x8 RGB, (N, 192) float32."""
    rows = [
        np.asarray(Image.open(images_dir / n).convert("RGB").resize((8, 8)), np.float32)
        for n in names
    ]
    return np.stack(rows).reshape(len(names), -1) / 255.0


def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> np.ndarray:
    """The file is a PNG of at least min_size pixels with real content (not one flat colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, f"{path} looks blank"
    return pixels


def test_word_counts_most_frequent_first():
    counts = plots.word_counts(["a dog runs", "a dog", "a cat on a mat"], top=3)
    assert counts == [("a", 4), ("dog", 2), ("runs", 1)]


def test_word_frequencies_on_fixture_captions(captions, tmp_path):
    counts = plots.word_counts(captions["caption"], top=50)
    assert len(counts) == min(50, len({w for c in captions["caption"] for w in c.split()}))
    assert counts[0][0] == "a"  # the most frequent word, in Flickr8k and in the synthetic set
    assert [c for _, c in counts] == sorted((c for _, c in counts), reverse=True)
    out = plots.word_frequencies(captions["caption"], tmp_path / "words.png")
    pixels = assert_png(out)
    assert pixels.shape[0] > pixels.shape[1]  # 50 horizontal bars: a tall chart


def test_word_frequencies_without_words_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionerError, match="no caption words"):
        plots.word_frequencies(["", " "], tmp_path / "words.png")
    assert not (tmp_path / "words.png").exists()


def test_sample_grid_shows_real_images(captions, images_dir, tmp_path):
    out = plots.sample_grid(captions, images_dir, tmp_path / "samples.png", count=6, seed=1)
    assert_png(out, min_size=(800, 600))


def test_sample_grid_marks_missing_images_instead_of_failing(captions, tmp_path):
    out = plots.sample_grid(captions, tmp_path / "nowhere", tmp_path / "samples.png", count=2)
    assert_png(out)
    # what the grid draws for a missing image: its name and "not readable", on grey
    figure = plot_figures.image_grid([(tmp_path / "nowhere" / "a.jpg", "a caption")], "title")
    marks = [(text.get_text(), axes.get_facecolor()) for axes in figure.axes for text in axes.texts]
    assert marks == [("a.jpg\nnot readable", (0.9, 0.9, 0.9, 1.0))]


def test_feature_clusters_finds_separated_groups():
    rng = np.random.default_rng(0)
    group_a = rng.normal(0.0, 0.1, (40, 64))
    group_b = rng.normal(5.0, 0.1, (30, 64))
    features = np.concatenate([group_a, group_b]).astype(np.float32)
    rows, coords, labels, ratio = plots.feature_clusters(features, clusters=2, seed=0)
    assert sorted(rows) == list(range(70)) and coords.shape == (70, 2)
    in_a = rows < 40
    assert len(set(labels[in_a])) == 1 and len(set(labels[~in_a])) == 1
    assert labels[in_a][0] != labels[~in_a][0]
    assert ratio[0] > 0.9  # the two groups differ along one direction
    again = plots.feature_clusters(features, clusters=2, seed=0)
    np.testing.assert_array_equal(rows, again[0])  # seeded: the same plot every time


def test_feature_clusters_samples_large_caches_without_repeats():
    features = np.random.default_rng(1).normal(size=(500, 16)).astype(np.float32)
    rows, coords, labels, _ = plots.feature_clusters(features, clusters=3, max_points=100)
    assert len(rows) == 100 == len(set(rows.tolist())) and coords.shape == (100, 2)
    assert set(labels.tolist()) == {0, 1, 2}


def test_feature_space_with_thumbnails(images_dir, tmp_path):
    names = sorted(p.name for p in images_dir.glob("*.jpg"))
    features = pixel_features(images_dir, names)
    out = plots.feature_space(
        features, names, images_dir, tmp_path / "features.png", clusters=3, examples=3
    )
    assert_png(out, min_size=(800, 400))


def test_loss_curves_from_a_run_history(tmp_path):
    history = tmp_path / "run" / "history.csv"
    history.parent.mkdir()
    history.write_text("epoch,loss,val_loss\n1,4.1,3.9\n2,3.2,3.4\n3,2.8,3.5\n")
    assert_png(plots.loss_curves(history, tmp_path / "loss.png"))

    history.write_text("epoch,accuracy\n0,0.1\n")
    with pytest.raises(CaptionerError, match="history.csv: no 'loss' column"):
        plots.loss_curves(history, tmp_path / "loss.png")


def test_prediction_grid_with_references(captions, images_dir, tmp_path):
    test = captions[captions["split"] == "test"].groupby("image")["caption"].apply(list)
    predictions = pd.DataFrame(
        {
            "image": test.index,
            "caption": "a dog runs on the grass",
            "references": [" | ".join(r) for r in test],
        }
    )
    csv = tmp_path / "predictions.csv"
    predictions.to_csv(csv, index=False)
    assert_png(
        plots.prediction_grid(csv, images_dir, tmp_path / "predictions.png"), min_size=(800, 500)
    )

    predictions.drop(columns="references").to_csv(csv, index=False)
    with pytest.raises(CaptionerError, match=r"predictions.csv: missing columns \['references'\]"):
        plots.prediction_grid(csv, images_dir, tmp_path / "predictions.png")


def test_first_reference_of_joined_references():
    assert plots._first_reference("a dog runs | a cat sits") == "a dog runs"
    assert plots._first_reference("a dog runs") == "a dog runs"


def test_missing_extra_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.delitem(sys.modules, "sklearn.cluster", raising=False)
    monkeypatch.delitem(sys.modules, "captioner.plots")
    with pytest.raises(CaptionerError) as error:
        importlib.import_module("captioner.plots")
    assert "pip install 'captioner[plots]'" in str(error.value)
    assert "\n" not in str(error.value)


def dataset_with_images(cfg, flickr8k_like: Path) -> None:
    """captions.csv/json and a feature cache (tinydata), the real images linked into raw/."""
    from tinydata import write_dataset

    write_dataset(cfg, flickr8k_like, {"train": 20, "dev": 5, "test": 5}, dim=16)
    cfg.raw_dir.mkdir(parents=True, exist_ok=True)
    (cfg.raw_dir / "Flicker8k_Dataset").symlink_to(flickr8k_like / "Flicker8k_Dataset")


@pytest.mark.slow
def test_plot_stage_writes_dataset_and_run_plots(tiny_config, flickr8k_like, tmp_path, capsys):
    cfg = tiny_config("demo")
    dataset_with_images(cfg, flickr8k_like)
    out = tmp_path / "plots"
    assert plots.plot(cfg, out) == [
        out / "samples.png",
        out / "word_frequencies.png",
        out / "feature_space.png",
    ]
    assert "skipping loss.png: no --run given" in capsys.readouterr().err

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "history.csv").write_text("epoch,loss,val_loss\n1,5.0,4.8\n2,4.1,4.3\n")
    written = plots.plot(cfg, out, run)
    assert [p.name for p in written] == [
        "samples.png",
        "word_frequencies.png",
        "feature_space.png",
        "loss.png",
    ]
    assert "skipping predictions.png: " in capsys.readouterr().err
    for path in written:
        assert_png(path)


def test_plot_stage_skips_features_without_a_cache(tiny_config, flickr8k_like, tmp_path, capsys):
    from tinydata import write_captions

    cfg = tiny_config("demo")
    write_captions(cfg, flickr8k_like, {"train": 3})
    written = plots.plot(cfg, tmp_path / "plots")
    assert [p.name for p in written] == ["samples.png", "word_frequencies.png"]
    assert "skipping feature_space.png: no finished feature cache" in capsys.readouterr().err


def test_plot_command_errors_are_one_line(tmp_path, flickr8k_like, tiny_config):
    from click.testing import CliRunner
    from tinydata import write_captions

    from captioner.cli import main

    base = [
        "plot",
        "--dataset",
        "demo",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "plots"),
    ]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 1 and "captions.csv: not found" in result.output
    write_captions(tiny_config("demo"), flickr8k_like, {"train": 2})
    result = CliRunner().invoke(main, [*base, "--run", str(tmp_path / "runs" / "nope")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'runs' / 'nope'}: run directory not "
        "found; pass a folder made by `captioner train`"
    )
