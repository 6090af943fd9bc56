"""Issue 15, "numbers not checked before work starts": every number and enumerated string is
checked once, when a Config is built, with one line naming the key and the allowed values; a
refused command creates nothing (no run folder that would then block the name)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner.cli import main
from captioner.config import LIMITS, Config, from_dict, load_config
from captioner.errors import ConfigError

# settings whose values are a fixed list of words (others, like features.encoder, are names)
ENUMERATED = {
    "data.split",
    "data.format",
    "features.precision",
    "features.dtype",
    "features.layout",
    "model.cell",
    "model.decoder",
    "train.precision",
    "train.strategy",
}


def leaf_fields(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """{"train.epochs": int, ...}: every setting of a Config and its type."""
    hints, found = typing.get_type_hints(cls), {}
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            found.update(leaf_fields(annotation, f"{prefix}{item.name}."))
        else:
            found[f"{prefix}{item.name}"] = annotation
    return found


def test_every_number_and_enumerated_setting_has_a_limit():
    numbers = {key for key, kind in leaf_fields(Config).items() if kind in (int, float)}
    assert numbers | ENUMERATED == set(LIMITS)


@pytest.mark.parametrize("dataset", ["demo", "flickr8k", "flickr30k", "mine"])
def test_defaults_and_bundled_configs_are_within_limits(dataset: str):
    load_config(None, (), dataset=dataset)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0", "'train.epochs' must be in [1, 100000], got 0"),
        ("train.epochs=-1", "'train.epochs' must be in [1, 100000], got -1"),
        ("train.batch_size=0", "'train.batch_size' must be in [1, 1048576], got 0"),
        ("train.batch_size=-5", "'train.batch_size' must be in [1, 1048576], got -5"),
        ("model.dropout=1.5", "'model.dropout' must be in [0, 1), got 1.5"),
        ("model.dropout=1", "'model.dropout' must be in [0, 1), got 1.0"),
        ("train.learning_rate=nan", "'train.learning_rate' must be in (0, 10], got nan"),
        ("train.learning_rate=inf", "'train.learning_rate' must be in (0, 10], got inf"),
        ("train.learning_rate=0", "'train.learning_rate' must be in (0, 10], got 0.0"),
        ("train.patience=-1", "'train.patience' must be in [0, 100000], got -1"),
        ("model.units=0", "'model.units' must be in [1, 65536], got 0"),
        ("seed=-1", "'seed' must be in [0, 4294967295], got -1"),
        ("tokenizer.min_count=0", "'tokenizer.min_count' must be in [1, 1000000000], got 0"),
        ("tokenizer.length_percentile=0", "'tokenizer.length_percentile' must be in (0, 100]"),
        ("decode.beam=0", "'decode.beam' must be in [1, 100], got 0"),
        ("decode.length_penalty=-1", "'decode.length_penalty' must be in [0, 10], got -1.0"),
        ("features.batch_size=0", "'features.batch_size' must be in [1, 65536], got 0"),
        ("download.timeout=0", "'download.timeout' must be in (0, 86400], got 0.0"),
        ("model.cell=rnn", "'model.cell' must be one of lstm, gru; got 'rnn'"),
        ("train.precision=float16", "'train.precision' must be one of float32, bfloat16; got"),
        ("train.strategy=tpu", "'train.strategy' must be one of default, mirrored, multiworker"),
        ("features.precision=fp8", "'features.precision' must be one of auto, float32, bfloat16"),
        ("features.dtype=float64", "'features.dtype' must be one of auto, float32, float16"),
        ("features.layout=both", "'features.layout' must be one of auto, pooled, grid; got"),
        ("features.grid_size=-1", "'features.grid_size' must be in [0, 1024], got -1"),
        ("features.image_size=16", "'features.image_size' must be 0 (the encoder's own) or at"),
        ("data.split=weird", "'data.split' must be one of official, karpathy, random; got"),
        ("data.format=xml", "'data.format' must be one of auto, flickr8k, kaggle"),
        ("features.shard=3/3", "'features.shard' must be I/N with 0 <= I < N (or empty)"),
        ("data.test_fraction=0.5", "'data.dev_fraction' + 'data.test_fraction' must be below 1"),
    ],
)
def test_out_of_range_is_one_line_naming_key_and_range(override: str, message: str):
    extra = ["data.dev_fraction=0.5"] if "fraction" in override else []
    with pytest.raises(ConfigError) as error:
        load_config(None, [override, *extra])
    assert str(error.value).startswith("config key") and "\n" not in str(error.value)
    assert message in str(error.value)


def test_every_way_of_building_a_config_is_checked(tmp_path: Path):
    values = load_config(None, ()).to_dict()
    values["model"]["dropout"] = 2.0
    with pytest.raises(ConfigError, match="'model.dropout' must be in"):
        from_dict(values)  # e.g. a run's hand-edited config.json
    bad_file = tmp_path / "c.toml"
    bad_file.write_text("[train]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match="'train.batch_size' must be in"):
        load_config(bad_file)
    with pytest.raises(ConfigError, match="'train.epochs' must be in"):
        dataclasses.replace(Config(), train=dataclasses.replace(Config().train, epochs=0))


BAD_TRAIN_FLAGS = [
    ["--epochs", "0"],
    ["--epochs", "-1"],
    ["--batch-size", "0"],
    ["--batch-size", "-5"],
    ["--set", "model.dropout=1.5"],
    ["--set", "model.cell=rnn"],
    ["--set", "train.precision=half"],
    ["--set", "train.learning_rate=nan"],
    ["--set", "tokenizer.min_count=0"],
]


@pytest.mark.parametrize("flags", BAD_TRAIN_FLAGS, ids=lambda flags: "".join(flags))
def test_cli_train_with_bad_numbers_creates_nothing(tmp_path: Path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--dataset", "demo", "--name", "x", *flags])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: config key '"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/x, no data/


@pytest.mark.parametrize(
    "command",
    [
        ["tokenizer", "--min-count", "0"],
        ["features", "--batch-size", "0"],
        ["clean", "--set", "data.dev_fraction=1"],
        ["download", "--set", "download.retries=-1"],
    ],
)
def test_every_stage_refuses_bad_numbers_before_work(tmp_path: Path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*command, "--dataset", "demo"])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and "config key '" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_setting_is_refused_before_tensorflow_starts(tmp_path: Path):
    """In a real process stderr holds only the error: TensorFlow (whose C++ start-up lines go
    straight to file descriptor 2) is not imported before the settings are checked."""
    done = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "train", "--epochs", "0", "--name", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "Error: config key 'train.epochs' must be in [1, 100000], got 0\n"
    assert list(tmp_path.iterdir()) == []
