"""monitor.py: the eager greedy captions equal decode.py's, and recording never stops training."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np

from captioner import decode, monitor
from captioner.config import ModelConfig
from captioner.models.merge import build_model
from captioner.tokenizer import Vocabulary

CAPTIONS = ["a dog runs on the grass", "a red circle on the left", "two dogs play in the snow"]


def test_eager_greedy_captions_equal_the_compiled_decoder():
    keras.utils.set_random_seed(0)
    vocab = Vocabulary.from_captions(CAPTIONS, min_count=1)
    for cell in ("lstm", "gru"):
        model = build_model(6, vocab.size, ModelConfig(units=8, embed_dim=4, cell=cell))
        features = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
        expected = [vocab.decode(ids) for ids in decode.greedy(model, features, vocab.max_length)]
        assert monitor.greedy_captions(model, features, vocab) == expected


def test_without_tensorboard_only_the_clock_is_kept(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name)
    )
    (only,) = monitor.callbacks(tmp_path, cfg=None, cache=None, vocab=None)
    assert isinstance(only, monitor.TrainingClock)
    assert "tensorboard is not installed" in capsys.readouterr().err


def test_dev_captions_that_fail_are_skipped_not_fatal(tmp_path, capsys):
    vocab = Vocabulary.from_captions(CAPTIONS, min_count=1)
    callback = monitor.DevCaptions(
        tmp_path, ["a.jpg"], np.zeros((1, 6), np.float32), [["a dog"]], vocab
    )
    callback.set_model(keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)]))
    callback.on_epoch_end(0)
    callback.on_epoch_end(1)  # disabled after the first failure: one line, not one per epoch
    callback.on_train_end()
    assert capsys.readouterr().err.count("dev captions for TensorBoard skipped") == 1
