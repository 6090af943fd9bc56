"""attention_maps.py and attention_plots.py on small real inputs: maps land where their regions
are, overlays light what was looked at, captions and maps come from the decoder's own search,
figures have a panel per word, a merge run is one line, not a crash.

The whole path on a trained run (train -> evaluate -> caption --attention -> plot -> app) is in
test_attention_views.py; that the maps are meaningful, in test_attention_real.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_app import built_runs

from captioner import attention_maps, decode
from captioner.attention_maps import ALL_WORDS, Attended
from captioner.cli import main
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.loaded_run import LoadedRun
from captioner.tokenizer import Vocabulary

GRID = (2, 3)  # H, W: not square, so a transposed map would land elsewhere


def one_hot(row: int, column: int, grid=GRID) -> np.ndarray:
    attention_map = np.zeros(grid, np.float32)
    attention_map[row, column] = 1.0
    return attention_map


@pytest.mark.parametrize("row, column", [(0, 0), (0, 2), (1, 1)])
def test_upsampled_map_peaks_inside_its_region(row, column):
    width, height = 90, 40  # regions of 30 x 20 pixels
    light = attention_maps.upsample(one_hot(row, column), (width, height))
    assert light.shape == (height, width) and light.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(light), light.shape)
    assert row * 20 <= y < (row + 1) * 20 and column * 30 <= x < (column + 1) * 30
    inside = light[row * 20 : (row + 1) * 20, column * 30 : (column + 1) * 30]
    assert inside.mean() > 3 * light.mean()  # smooth, but most of the light is in the region
    assert light.min() >= 0
    assert not attention_maps.upsample(np.zeros(GRID), (9, 4)).any()


def test_overlay_lights_the_attended_region_and_darkens_the_rest():
    image = Image.new("RGB", (600, 400), (200, 100, 50))
    lit = np.asarray(attention_maps.overlay(image, one_hot(1, 2)), np.float32)
    assert lit.shape == (213, 320, 3)  # shrunk to OVERLAY_SIDE, aspect kept
    bottom_right, top_left = lit[180, 290], lit[20, 20]
    np.testing.assert_allclose(bottom_right, [200, 100, 50], atol=8)
    np.testing.assert_allclose(top_left, np.array([200, 100, 50]) * attention_maps.DIM, atol=2)


def test_png_names_never_give_two_images_one_file():
    names = attention_maps.png_names(["a/x.jpg", "b/x.png", "b/X.jpg", "y.jpeg", "c/x.jpg"])
    assert names == {
        "a/x.jpg": "x.png",
        "b/x.png": "x-2.png",
        "b/X.jpg": "X-3.png",  # one file on a case-insensitive disk
        "y.jpeg": "y.png",
        "c/x.jpg": "x-4.png",
    }


def test_word_picker_offers_every_word_and_each_one():
    attended = Attended(("a", "red", "a"), np.stack([one_hot(0, 0), one_hot(1, 2), one_hot(0, 1)]))
    assert attention_maps.word_choices(attended) == [ALL_WORDS, "1. a", "2. red", "3. a"]
    image = Image.new("RGB", (60, 40), "white")
    every = attention_maps.word_overlays(image, attended, ALL_WORDS)
    assert [word for _, word in every] == ["a", "red", "a"]
    (picture, word), *others = attention_maps.word_overlays(image, attended, "3. a")
    assert word == "a" and not others
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(every[2][0]))
    assert not np.array_equal(np.asarray(picture), np.asarray(every[0][0]))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """An attention and a merge LoadedRun with random weights (no training), as load_run makes
    them: real vocabulary, the model, the features meta."""
    import keras

    from captioner import models

    keras.utils.set_random_seed(3)
    vocab = Vocabulary.from_captions(
        ["a red circle on the left", "a blue square at the top", "two shapes on gray"]
    )
    made = {}
    for decoder in ("attention", "merge"):
        cfg = load_config(
            None,
            (f"model.decoder={decoder}", "model.units=12", "model.embed_dim=8"),
            dataset="mini",
            **{"model.attention_units": 8, "decode.beam": 2},
        )
        meta = {"encoder": "x", "dim": 4, "count": 1}
        if decoder == "attention":
            meta |= {"layout": "grid", "grid": list(GRID)}
        model = models.build(cfg, meta, vocab.size)
        root = tmp_path_factory.mktemp(decoder)
        made[decoder] = LoadedRun(root, cfg, vocab, model, meta)
    return made


def test_attend_features_gives_the_decoders_words_and_maps_as_grids(tiny_runs):
    run = tiny_runs["attention"]
    features = np.random.default_rng(0).normal(size=(5, *GRID, 4)).astype(np.float32)
    attended = attention_maps.attend_features(run, features)
    settings = run.decode_settings()
    ids, maps = decode.decode(run.model, features, **settings.to_dict(), attention=True)
    assert [a.caption for a in attended] == run.caption_features(features)
    for one, words, flat in zip(attended, ids, maps, strict=True):
        assert one.words == tuple(run.vocab.tokens[i] for i in words)
        assert one.maps.shape == (len(words), *GRID)
        np.testing.assert_array_equal(one.maps.reshape(len(words), 6), flat)  # row-major
        np.testing.assert_allclose(one.maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert any(len(one.words) > 1 for one in attended)
    assert attention_maps.attend_features(run, features[:0]) == []

    merge = tiny_runs["merge"]
    pooled = features.mean(axis=(1, 2))
    plain = attention_maps.attend_features(merge, pooled)
    assert all(one.maps is None for one in plain)
    assert [one.caption for one in plain] == merge.caption_features(pooled)


def test_a_grid_that_disagrees_with_the_model_is_one_line(tiny_runs):
    run = tiny_runs["attention"]
    broken = LoadedRun(
        run.run_dir, run.cfg, run.vocab, run.model, {"layout": "grid", "grid": [3, 3]}
    )
    features = np.zeros((1, *GRID, 4), np.float32)
    with pytest.raises(CaptionerError, match=r"grid \(3, 3\) does not match the model's 6"):
        attention_maps.attend_features(broken, features)


def test_figure_has_the_image_and_a_panel_per_word(flickr8k_like, tmp_path):
    from captioner import attention_plots

    image = flickr8k_like / "Flicker8k_Dataset" / "demo_00000.jpg"
    words = ("a", "big", "red", "circle", "on", "the", "left")
    maps = np.stack([one_hot(i % 2, i % 3) for i in range(len(words))])
    figure = attention_plots.attention_figure(image, Attended(words, maps), "demo_00000.jpg")
    titles = [axes.get_title() for axes in figure.axes if axes.images]
    assert titles == ["", *words]  # the image, then each word's map: 2 rows of 6 panels
    out = attention_plots.write_attention_png(tmp_path / "x.png", image, Attended(words, maps), "t")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > png.height > 200
    with pytest.raises(CaptionerError, match="no figure"):
        attention_plots.attention_figure(image, Attended(words, None), "merge")


def test_caption_attention_without_matplotlib_is_one_line_before_any_work(monkeypatch, tmp_path):
    import captioner

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.delitem(sys.modules, "captioner.attention_plots", raising=False)
    if hasattr(captioner, "attention_plots"):
        monkeypatch.delattr(captioner, "attention_plots")
    monkeypatch.setattr("captioner.caption.load_run", lambda *a: pytest.fail("a run was loaded"))
    result = CliRunner().invoke(
        main, ["caption", "x.jpg", "--model", str(tmp_path), "--attention", str(tmp_path / "m")]
    )
    assert result.exit_code == 1
    assert result.output == (
        "Error: attention figures need matplotlib; pip install 'captioner[plots]'\n"
    )


@pytest.mark.slow  # builds a random-weight MobileNetV3Small to caption with (~15 s)
def test_caption_attention_with_a_merge_run_says_so_and_still_captions(
    tmp_path_factory, flickr8k_like, tmp_path
):
    runs = built_runs(tmp_path_factory.getbasetemp() / "app-runs", flickr8k_like)  # test_app's
    image = flickr8k_like / "Flicker8k_Dataset" / "demo_00000.jpg"
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        main, ["caption", str(image), "--model", str(runs[0]), "--attention", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"{image}\t{runs[0].name}\t")
    said = [line for line in result.stderr.splitlines() if "no attention maps" in line]
    assert said == [
        f"{runs[0]}: no attention maps to draw: a merge run sees one vector per image "
        "(--attention draws attention runs)"
    ]
    assert not out.exists()
