"""Issue 15, scores that were silently wrong or lost: a run pins the data it was trained on
(data.json), evaluate refuses other captions or splits, and every split and decoding setting
keeps its own result files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from guard import changed_outside, snapshot
from test_evaluate import write_run

from captioner import evaluate, run_data
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.io import file_sha256, names_sha256


@pytest.fixture
def pinned(tmp_path, tiny_config, flickr8k_fixtures):
    """A finished run (14 train, 4 dev, 6 test images) with its data.json, as train writes it."""
    run_dir, cfg = write_run(tmp_path, tiny_config, flickr8k_fixtures)
    run_data.pin(run_dir, cfg)
    return run_dir, cfg


def resplit(cfg, moves: dict[str, str]) -> None:
    """Rewrite captions.csv with some images in another split, as a new `clean` would."""
    frame = pd.read_csv(cfg.captions_csv, dtype=str, keep_default_na=False)
    frame["split"] = [moves.get(image, split) for image, split in frame[["image", "split"]].values]
    frame.to_csv(cfg.captions_csv, index=False)


def test_data_json_describes_the_captions_and_each_split(pinned):
    run_dir, cfg = pinned
    data = json.loads((run_dir / "data.json").read_text())
    assert data["captions_sha256"] == file_sha256(cfg.captions_csv)
    assert {split: info["images"] for split, info in data["splits"].items()} == {
        "dev": 4,
        "test": 6,
        "train": 14,
    }
    frame = pd.read_csv(cfg.captions_csv, dtype=str)
    test_images = sorted(set(frame.loc[frame["split"] == "test", "image"]))
    assert data["splits"]["test"]["images_sha256"] == names_sha256(test_images)


def test_a_resplit_dataset_is_refused_never_reused(pinned, tmp_path):
    run_dir, cfg = pinned
    first = evaluate.evaluate(run_dir, split="test", beam=1, with_meteor=False)
    frame = pd.read_csv(cfg.captions_csv, dtype=str)
    trained_on = frame.loc[frame["split"] == "train", "image"].iloc[0]
    resplit(cfg, {trained_on: "test"})  # a training image is now a "test" image
    before = snapshot(tmp_path)
    with pytest.raises(CaptionerError) as error:
        evaluate.evaluate(run_dir, split="test", beam=1, with_meteor=False)
    message = str(error.value)
    assert "\n" not in message and "not the captions run" in message
    assert "the test/train split holds other images" in message
    first.unlink()  # without the old result it still refuses: it never scores other data
    with pytest.raises(CaptionerError, match="not the captions run"):
        evaluate.evaluate(run_dir, split="dev", beam=1, with_meteor=False)
    assert changed_outside(tmp_path, before, [first]) == []


def test_other_captions_for_the_same_images_are_refused_in_one_cli_line(pinned, tmp_path):
    run_dir, cfg = pinned
    frame = pd.read_csv(cfg.captions_csv, dtype=str, keep_default_na=False)
    frame.loc[0, "caption"] = "a different caption"
    frame.to_csv(cfg.captions_csv, index=False)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--beam", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "same images per split, other captions" in line and "data.json" in line
    assert changed_outside(tmp_path, before) == []


def test_each_split_and_setting_keeps_its_own_result(pinned, capsys):
    run_dir, _ = pinned
    test = evaluate.evaluate(run_dir, split="test", beam=1, with_meteor=False)
    kept = test.read_bytes(), (run_dir / "predictions-test-beam1.csv").read_bytes()
    dev = evaluate.evaluate(run_dir, split="dev", beam=1, with_meteor=False)
    assert (test.name, dev.name) == ("metrics-test-beam1.json", "metrics-dev-beam1.json")
    assert (test.read_bytes(), (run_dir / "predictions-test-beam1.csv").read_bytes()) == kept
    assert json.loads(dev.read_text())["split"] == "dev"
    assert len(pd.read_csv(run_dir / "predictions-dev-beam1.csv")) == 4
    capsys.readouterr()
    assert evaluate.evaluate(run_dir, split="test", beam=1, with_meteor=False) == test
    assert "reusing" in capsys.readouterr().err and test.read_bytes() == kept[0]
    assert run_data.find_predictions(run_dir, "test") == run_dir / "predictions-test-beam1.csv"
    assert not (run_dir / "metrics.json").exists()


def test_result_names_carry_the_decoding_settings():
    settings = {"beam": 3, "length_penalty": 0.0, "no_repeat_ngram": 0, "max_length": 20}
    assert run_data.result_tag("test", settings, 20) == "test-beam3"
    settings = {"beam": 5, "length_penalty": 0.7, "no_repeat_ngram": 3, "max_length": 12}
    assert run_data.result_tag("dev", settings, 20) == "dev-beam5-lp0.7-norepeat3-max12"
    assert run_data.result_tag("../x", settings, 12) == "___x-beam5-lp0.7-norepeat3"


def test_an_old_run_is_scored_with_a_warning_and_its_results_are_still_read(
    tmp_path, tiny_config, flickr8k_fixtures, capsys
):
    run_dir, _ = write_run(tmp_path, tiny_config, flickr8k_fixtures)  # no data.json
    legacy = {"split": "test", "decoding": {"beam": 1}, "metrics": {}}
    (run_dir / "metrics.json").write_text(json.dumps(legacy))
    (run_dir / "predictions.csv").write_text("image,caption,references\na.jpg,a dog,a dog\n")
    assert run_data.find_predictions(run_dir, "test") == run_dir / "predictions.csv"
    assert run_data.find_predictions(run_dir, "dev") is None
    path = evaluate.evaluate(run_dir, split="test", beam=1, with_meteor=False)
    assert "no data.json" in capsys.readouterr().err  # warned, and not "reusing" the old file
    assert path.name == "metrics-test-beam1.json"
    assert json.loads((run_dir / "metrics.json").read_text()) == legacy  # left as it was
    assert run_data.find_predictions(run_dir, "test") == run_dir / "predictions-test-beam1.csv"
