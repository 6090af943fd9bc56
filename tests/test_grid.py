"""Grid feature caches (N, H, W, C): read memory-mapped and checked like pooled ones, given to
each decoder in the shape it takes (feature_cache.for_decoder), and trained on by the merge
model as the mean over regions, dropped in from any model of any H, W, C."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from tinydata import write_dataset, write_features

from captioner import data
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.feature_cache import for_decoder, load_cache
from captioner.io import read_json

GRID_ERROR = "decoder attention needs a grid cache: run `captioner features --grid`"


def test_a_dropped_in_grid_of_any_shape_is_read_memory_mapped(tmp_path):
    folder = tmp_path / "features" / "oddgrid"
    ids = [f"{k}.jpg" for k in range(6)]
    stored = write_features(folder, ids, dim=7, grid=(3, 5), dtype="float16")
    cache = load_cache(folder)
    assert isinstance(cache.features, np.memmap) and cache.features.shape == (6, 3, 5, 7)
    assert (cache.layout, cache.grid, cache.meta["dim"]) == ("grid", (3, 5), 7)
    assert cache.describe() == "3x5 grid of 7-d"

    grid = cache.rows([4, 1], "grid", "attention")  # (2, H, W, C) float32, as stored
    assert grid.dtype == np.float32
    np.testing.assert_array_equal(grid, stored[[4, 1]].astype(np.float32))
    pooled = cache.rows([4, 1], "pooled", "merge")  # (2, C): the mean over the 15 regions
    assert pooled.shape == (2, 7) and pooled.dtype == np.float32
    expected = stored[[4, 1]].astype(np.float64).reshape(2, 15, 7).mean(axis=1)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)

    pooled_cache = load_cache(write_features_dir(tmp_path / "features" / "flat", ids))
    assert (pooled_cache.layout, pooled_cache.grid) == ("pooled", None)
    with pytest.raises(CaptionerError) as error:
        pooled_cache.rows([0], "grid", "attention")
    assert str(error.value) == f"{pooled_cache.path}: pooled features; {GRID_ERROR}"
    with pytest.raises(CaptionerError, match=GRID_ERROR.replace("`", ".")):
        for_decoder(np.zeros((2, 7), np.float32), "grid", "attention")


def write_features_dir(folder, ids):
    write_features(folder, ids, dim=7)
    return folder


def test_broken_grid_caches_are_one_line_errors(tmp_path):
    folder = tmp_path / "grid"
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    write_features(folder, ids, dim=4, grid=(2, 3))
    meta = read_json(folder / "meta.json")

    def load_with(**changes) -> str:
        (folder / "meta.json").write_text(json.dumps({**meta, **changes}))
        with pytest.raises(CaptionerError) as error:
            load_cache(folder)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "meta.json says 3 x 3 x 2 x 4" in load_with(grid=[3, 2])  # H and W swapped
    assert "features.npy is (3, 2, 3, 4)" in load_with(dim=12)
    assert "layout 'grid' with grid None" in load_with(grid=None)
    assert "layout 'spatial'" in load_with(layout="spatial")
    assert "meta.json says 3 x 4" in load_with(layout="pooled")  # a grid is not (N, D)

    (folder / "meta.json").write_text(json.dumps(meta))
    array = np.load(folder / "features.npy", mmap_mode="r+")
    array[2, 1, 2, 3] = np.inf  # one value of one region of the last image
    array.flush()
    del array
    with pytest.raises(CaptionerError, match=r"1 row\(s\) hold NaN or infinity .* row 2, c.jpg"):
        load_cache(folder)


@pytest.fixture
def grid_memmap(tmp_path) -> np.ndarray:
    """A (30, 3, 2, 5) float16 grid opened as a memmap, like a grid cache's features.npy."""
    values = np.random.default_rng(2).normal(size=(30, 3, 2, 5)).astype(np.float16)
    np.save(tmp_path / "grid.npy", values)
    return np.load(tmp_path / "grid.npy", mmap_mode="r", allow_pickle=False)


@pytest.mark.parametrize("takes", ["grid", "pooled"])
def test_training_batches_have_the_shape_the_decoder_takes(grid_memmap, takes):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 30, size=40)
    captions = [rng.integers(4, 50, size=rng.integers(1, 9)).tolist() for _ in rows]
    dataset = data.make_dataset(
        grid_memmap, rows, captions, 8, shuffle=True, seed=1, takes=takes, decoder="d"
    )
    expected = for_decoder(np.asarray(grid_memmap), takes, "d")  # (30, 3, 2, 5) or (30, 5)
    assert dataset.element_spec[0]["features"].shape.as_list() == [None, *expected.shape[1:]]
    seen = Counter()
    for inputs, targets in dataset:
        features, tokens = inputs["features"].numpy(), targets.numpy()
        for feature, target in zip(features, tokens, strict=True):
            caption = tuple(target[: int((target != 0).sum()) - 1])  # without <end>
            matches = [r for r in range(30) if np.array_equal(feature, expected[r])]
            seen[(matches[0], caption)] += 1
    assert seen == Counter((int(r), tuple(c)) for r, c in zip(rows, captions, strict=True))

    mean, variance = data.feature_stats(grid_memmap, rows, chunk_size=4, takes=takes)
    vectors = expected[np.unique(rows)].reshape(-1, 5).astype(np.float64)  # per image or region
    np.testing.assert_allclose(mean, vectors.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, vectors.var(axis=0), rtol=1e-4, atol=1e-6)


def test_pooled_features_for_a_grid_decoder_fail_before_training(tmp_path):
    values = np.zeros((4, 6), np.float32)
    np.save(tmp_path / "pooled.npy", values)
    memmap = np.load(tmp_path / "pooled.npy", mmap_mode="r")
    with pytest.raises(CaptionerError, match=GRID_ERROR.replace("`", ".")):
        data.make_dataset(
            memmap, [0, 1], [[4], [5]], 2, False, 0, takes="grid", decoder="attention"
        )


@pytest.mark.slow  # trains and evaluates a tiny run (~30 s)
def test_merge_trains_and_evaluates_on_a_dropped_in_grid_cache(tmp_path, flickr8k_like):
    """Another model's 3x5x7 float16 grid in features/oddgrid/: `captioner train --encoder
    oddgrid` trains the merge model on its mean over regions, evaluate scores it the same way."""
    from captioner.config import load_config

    flags = {"data.data_dir": str(tmp_path / "data"), "train.runs_dir": str(tmp_path / "runs")}
    cfg = load_config(None, (), dataset="mini", **flags, **{"features.encoder": "oddgrid"})
    write_dataset(cfg, flickr8k_like, {"train": 30, "dev": 6, "test": 6}, dim=7, grid=(3, 5))
    tiny = ["model.units=8", "model.embed_dim=8", "tokenizer.min_count=2", "train.batch_size=32"]
    args = ["--dataset", "mini", "--data-dir", flags["data.data_dir"]]
    result = CliRunner().invoke(
        main,
        ["train", *args, "--encoder", "oddgrid", "--epochs", "1", "--name", "g"]
        + [f"--set=train.runs_dir={flags['train.runs_dir']}"]
        + [f"--set={setting}" for setting in tiny],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "g"
    assert "features 3x5 grid of 7-d" in result.stderr
    assert read_json(run_dir / "features_meta.json")["grid"] == [3, 5]
    assert "(weights hand-made), 3x5 grid of 7-d features" in (run_dir / "README.md").read_text()

    from captioner.loaded_run import load_run

    model = load_run(run_dir, with_encoder=False).model
    assert tuple(model.input["features"].shape) == (None, 7)  # merge: one C-vector per image
    scored = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--beam", "1"])
    assert scored.exit_code == 0, scored.output
    metrics = read_json(next(run_dir.glob("metrics-test-beam1*.json")))
    assert metrics["images"] == 6 and 0 <= metrics["metrics"]["bleu4"] <= 1
