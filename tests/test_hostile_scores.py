"""Issue 15, "scores that are silently wrong": a NaN anywhere stops with one line instead of
finishing a run, a feature cache with non-finite rows is refused when opened, JSON never holds a
bare NaN, and a vocabulary without words is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import mini_config, run_args
from tinydata import write_dataset

from captioner import feature_cache, rundir, train
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.feature_cache import load_cache
from captioner.io import read_json, write_json
from captioner.tokenizer import Vocabulary

SIZES = {"train": 12, "dev": 4}
HANDMADE = {"features.encoder": "handmade"}  # the cache tinydata writes


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 1; stderr: progress lines of the stages that ran, then the error in one line."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def poison(features_dir: Path, row: int, value: float = np.nan) -> None:
    """Set one value of one row of a finished cache, in place (as a damaged file would be)."""
    array = np.load(features_dir / "features.npy", mmap_mode="r+")
    array[row, 0] = value
    array.flush()
    del array


# --- JSON ---------------------------------------------------------------------------------------
def test_write_json_refuses_nan_and_infinity_and_keeps_the_old_file(tmp_path: Path):
    path = write_json(tmp_path / "state.json", {"epoch": 1})
    for bad, where in [
        ({"history": [{"loss": 1.0}, {"loss": math.nan}]}, "history.1.loss"),
        ({"best_val_loss": math.inf}, "best_val_loss"),
        (-math.inf, "the value"),
    ]:
        with pytest.raises(CaptionerError) as error:
            write_json(path, bad)
        assert str(error.value) == (
            f"{path}: not written, {where} is not a finite number (JSON has no NaN or infinity)"
        )
    assert read_json(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# --- non-finite loss ----------------------------------------------------------------------------
def test_non_finite_loss_stops_before_anything_is_saved(tmp_path: Path):
    import keras

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="adam", loss="mse")  # RunCheckpoint reads the learning rate
    state = rundir.initial_state(mini_config(tmp_path, **{"train.epochs": 3}))
    callback = train.RunCheckpoint(tmp_path, state, patience=0)
    callback.set_model(model)
    callback.on_epoch_end(0, {"loss": 2.0, "val_loss": 2.5})
    before = (tmp_path / "state.json").read_text()
    for logs in ({"loss": math.nan, "val_loss": 2.0}, {"loss": 1.0, "val_loss": math.inf}):
        with pytest.raises(CaptionerError) as error:
            callback.on_epoch_end(1, logs)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{tmp_path}: training diverged in")
        assert "train.learning_rate" in message and "keeps its 1 good epochs" in message
    assert (tmp_path / "state.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001.keras"]


@pytest.mark.slow  # trains one tiny epoch
def test_nan_loss_during_training_never_finishes_a_run(
    tmp_path: Path, flickr8k_fixtures, monkeypatch
):
    """A NaN learning rate (config refuses one, so it is slipped in here) makes the loss NaN:
    training stops with one line and state.json stays strict JSON of an unfinished run."""
    cfg = mini_config(tmp_path, **HANDMADE, **{"train.name": "nan"})
    write_dataset(cfg, flickr8k_fixtures, SIZES, dim=5)
    from captioner.models import merge

    compile_model = merge.compile_model
    monkeypatch.setattr(merge, "compile_model", lambda net, rate: compile_model(net, math.nan))
    with pytest.raises(CaptionerError, match="training diverged in epoch 1 \\(loss nan"):
        train.train(cfg)
    run_dir = Path(cfg.train.runs_dir) / "nan"
    state = json.loads((run_dir / "state.json").read_text())  # strict JSON: no bare NaN
    assert state["finished"] is False and state["epoch"] == 0 and state["history"] == []
    assert not (run_dir / "model.keras").exists()
    assert (run_dir / "history.csv").read_text() == "epoch,loss,val_loss\n"


# --- the feature cache --------------------------------------------------------------------------
def test_cache_with_non_finite_rows_is_refused_reading_in_blocks(
    tmp_path: Path, flickr8k_fixtures, monkeypatch
):
    cfg = mini_config(tmp_path, **HANDMADE)
    write_dataset(cfg, flickr8k_fixtures, SIZES, dim=5)
    folder = cfg.features_dir
    ids = (folder / "ids.txt").read_text().split()
    monkeypatch.setattr(feature_cache, "CHECK_BYTES", 3 * 5 * 4)  # 3 rows per block
    blocks = []
    real_isfinite = np.isfinite
    monkeypatch.setattr(
        np, "isfinite", lambda block: blocks.append(len(block)) or real_isfinite(block)
    )

    load_cache(folder)  # finite: passes and is recorded
    assert blocks == [3, 3, 3, 3, 3, 1] and read_json(folder / "checked.json")["finite"]
    load_cache(folder)
    assert len(blocks) == 6  # an unchanged cache is not read again

    poison(folder, 7)
    poison(folder, 14, np.inf)
    with pytest.raises(CaptionerError) as error:
        load_cache(folder)
    assert str(error.value) == (
        f"{folder / 'features.npy'}: 2 row(s) hold NaN or infinity (the first is row 7, "
        f"{ids[7]}); run `captioner features` (delete {folder} first if it is corrupt)"
    )


def test_float16_overflow_is_refused(tmp_path: Path):
    folder = tmp_path / "features" / "half"
    folder.mkdir(parents=True)
    with np.errstate(over="ignore"):  # 70000 is past float16's largest value: it becomes inf
        np.save(folder / "features.npy", np.array([[1.0, 7e4]], np.float32).astype(np.float16))
    (folder / "ids.txt").write_text("a.jpg\n")
    write_json(folder / "meta.json", {"encoder": "half", "dim": 2, "count": 1})
    with pytest.raises(CaptionerError, match="1 row\\(s\\) hold NaN or infinity .*row 0, a.jpg"):
        load_cache(folder)


def test_cli_train_on_a_nan_cache_is_one_line_and_makes_no_run(tmp_path: Path, flickr8k_fixtures):
    cfg = mini_config(tmp_path, **HANDMADE)
    write_dataset(cfg, flickr8k_fixtures, SIZES, dim=5)
    poison(cfg.features_dir, 3)
    result = CliRunner().invoke(main, run_args(cfg, "x"))
    assert_one_line_error(result, "features.npy: 1 row(s) hold NaN or infinity", "row 3")
    assert not Path(cfg.train.runs_dir).exists()


# --- the vocabulary -----------------------------------------------------------------------------
def test_vocabulary_without_words_is_refused():
    with pytest.raises(CaptionerError) as error:
        Vocabulary.from_captions(["a dog runs", "a dog sits"], min_count=1_000_000)
    assert str(error.value) == (
        "tokenizer.min_count=1000000 keeps no word (the most frequent training word is seen "
        "2 times in 2 captions); lower --min-count"
    )


def test_a_saved_vocabulary_without_words_is_refused(tmp_path: Path):
    words = Vocabulary.from_captions(["a dog", "a dog"], min_count=2)
    path = write_json(tmp_path / "vocab.json", {**words.to_json(), "tokens": words.tokens[:4]})
    with pytest.raises(CaptionerError, match="vocab.json: a vocabulary without words; rebuild"):
        Vocabulary.load(path)


def test_cli_min_count_too_high_writes_no_vocabulary_and_no_run(tmp_path: Path, flickr8k_fixtures):
    cfg = mini_config(tmp_path, **HANDMADE)
    write_dataset(cfg, flickr8k_fixtures, SIZES, dim=5)
    args = ["--dataset", "mini", "--data-dir", cfg.data.data_dir]
    result = CliRunner().invoke(main, ["tokenizer", *args, "--min-count", "1000000"])
    assert_one_line_error(result, "tokenizer.min_count=1000000 keeps no word")
    assert not cfg.vocab_json.exists()
    result = CliRunner().invoke(main, [*run_args(cfg, "x"), "--set=tokenizer.min_count=1000000"])
    assert_one_line_error(result, "keeps no word")
    assert not Path(cfg.train.runs_dir).exists()


def test_cli_train_refused_after_the_earlier_stages_makes_no_run(tmp_path, flickr8k_fixtures):
    """Inputs are checked before the run folder is made: here, a dataset without a dev split."""
    cfg = mini_config(tmp_path, **HANDMADE)
    write_dataset(cfg, flickr8k_fixtures, {"train": 12}, dim=5)
    result = CliRunner().invoke(main, run_args(cfg, "x"))
    assert_one_line_error(result, "no dev captions with features")
    assert not Path(cfg.train.runs_dir).exists()
