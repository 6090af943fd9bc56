from pathlib import Path

import pytest

from captioner.config import load_config, replace
from captioner.errors import ConfigError


def test_bundled_config_then_set_then_flags(tmp_path: Path):
    cfg = load_config(
        None,
        ["train.epochs=7", "features.weights=none"],
        dataset="flickr8k",
        **{"train.epochs": 9, "data.data_dir": str(tmp_path)},
    )
    assert cfg.data.dataset == "flickr8k"
    assert cfg.download.md5[0] == "f18a1e2920de5bd84dae7cf08ec78978"  # from configs/flickr8k.toml
    assert cfg.train.epochs == 9  # flags beat --set
    assert cfg.features.weights == "none"
    assert cfg.captions_csv == tmp_path / "flickr8k" / "captions.csv"


def test_config_file_overrides_defaults(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "mine"\n[train]\nlearning_rate = 1\n')
    cfg = load_config(path)
    assert cfg.data.dataset == "mine" and cfg.train.learning_rate == 1.0
    assert isinstance(cfg.train.learning_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=5", "unknown config key 'train.epoch'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("train.epochs=five", "config key 'train.epochs' must be int"),
        ("train.epochs=true", "config key 'train.epochs' must be int"),
        (
            "model.normalize_features=1",
            "config key 'model.normalize_features' must be true or false",
        ),
        ("download.urls=3", "config key 'download.urls' must be a list of strings"),
        ("train=3", "config key 'train' must be a [section]"),
    ],
)
def test_bad_keys_and_types_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_unreadable_config_file_is_one_line_error(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_replace_round_trips_and_validates():
    cfg = load_config(None, [], dataset="demo")
    assert replace(cfg, **{"train.epochs": 2}).train.epochs == 2
    with pytest.raises(ConfigError):
        replace(cfg, **{"train.nope": 2})
