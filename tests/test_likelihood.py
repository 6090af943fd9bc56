"""A caption's log-probability from one teacher-forced pass equals the sum of the decoder's own
step-by-step log-probabilities, over <end> and the words, for every cell and both ways a caption
ends (at <end>, or cut at max_length)."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.config import ModelConfig
from captioner.text import END_ID


def stepped_log_probs(model, features: np.ndarray, captions, max_length: int) -> list[float]:
    """The decoder interface one token at a time (eager), softmax over <end> and the words."""
    import tensorflow as tf

    from captioner.models import decoder_for
    from captioner.text import START_ID

    decoder = decoder_for(model)
    sums = []
    for row, words in enumerate(captions):
        state = decoder.start(tf.constant(features[row : row + 1]))
        token, total = START_ID, 0.0
        for target in list(words) + ([END_ID] if len(words) < max_length else []):
            hidden, state, _ = decoder.step(tf.constant([token]), state)
            logits = decoder.logits(hidden).numpy()[0, END_ID:].astype(np.float64)  # (V - 3,)
            shifted = logits - logits.max()
            total += shifted[target - END_ID] - np.log(np.exp(shifted).sum())  # log-softmax
            token = target
        sums.append(total)
    return sums


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.filterwarnings("ignore:Layer '.*_cell'.*does not support masking")  # eager steps
def test_log_probabilities_equal_the_decoders_step_by_step_sums(cell):
    import keras

    from captioner import decode
    from captioner.likelihood import feature_shape, log_probabilities
    from captioner.models.merge import build_model

    keras.utils.set_random_seed(3)
    model = build_model(12, 40, ModelConfig(embed_dim=8, units=16, cell=cell))
    assert feature_shape(model) == (12,)
    features = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    ended = [[4, 5, 6], [7], [39, 39], [8, 9, 10, 11, 12], [20]]  # any captions ending in <end>
    kernel, bias = model.get_layer("logits").get_weights()
    bias[END_ID] = -1e4  # <end> never chosen: every caption is cut at max_length
    model.get_layer("logits").set_weights([kernel, bias])
    cut = decode.decode(model, features, max_length=6)
    assert all(len(words) == 6 for words in cut)
    for captions, max_length in ((ended, 8), (cut, 6), ([[]] * 5, 8)):
        ours = log_probabilities(model, features, captions, max_length)
        assert ours.shape == (5,) and (ours <= 0).all()
        expected = stepped_log_probs(model, features, captions, max_length)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert log_probabilities(model, features[:0], [], 6).shape == (0,)
