"""monitor.py: the eager greedy captions equal decode.py's, dev scores are theirs, and recording
never stops training."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

from captioner import decode, monitor
from captioner.config import ModelConfig
from captioner.metrics import bleu, cider_d
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


def test_dev_scores_are_the_greedy_captions_bleu4_and_cider_d(tmp_path):
    from test_train import event_values

    keras.utils.set_random_seed(0)
    vocab = Vocabulary.from_captions(CAPTIONS, min_count=1)
    model = build_model(6, vocab.size, ModelConfig(units=8, embed_dim=4))
    features = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32)
    references = [[CAPTIONS[i % 3], CAPTIONS[(i + 1) % 3]] for i in range(6)]
    images = [f"{i}.jpg" for i in range(6)]
    callback = monitor.DevScores(tmp_path, images, features, references, vocab, scored=5)
    callback.set_model(model)
    callback.on_epoch_end(0)
    callback.on_train_end()
    captions = monitor.greedy_captions(model, features, vocab)[:5]
    logs = event_values(tmp_path)
    assert logs["epoch_bleu4"] == [(0, pytest.approx(bleu(captions, references[:5])["bleu4"]))]
    assert logs["epoch_cider_d"] == [(0, pytest.approx(cider_d(captions, references[:5])))]
    (_, table), *_ = logs["dev_captions"]
    assert len(table.splitlines()) == 2 + monitor.SHOWN


def test_dev_captions_that_fail_are_skipped_not_fatal(tmp_path, capsys):
    vocab = Vocabulary.from_captions(CAPTIONS, min_count=1)
    callback = monitor.DevScores(
        tmp_path, ["a.jpg"], np.zeros((1, 6), np.float32), [["a dog"]], vocab, scored=1
    )
    callback.set_model(keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)]))
    callback.on_epoch_end(0)
    callback.on_epoch_end(1)  # disabled after the first failure: one line, not one per epoch
    callback.on_train_end()
    assert capsys.readouterr().err.count("dev captions for TensorBoard skipped") == 1
