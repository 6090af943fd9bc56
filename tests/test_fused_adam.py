"""FusedAdam (models/fused_adam.py) takes the steps keras.optimizers.Adam takes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.models.fused_adam import FusedAdam


def trajectory(optimizer: keras.optimizers.Optimizer, steps: int = 5) -> list[np.ndarray]:
    """The weights of a dense kernel and an embedding after `steps` updates from the same start,
    with the same gradients (the embedding's sparse, as Keras gives them) and a learning rate
    changed halfway, as train.py's decay does."""
    rng = np.random.default_rng(0)
    kernel = keras.Variable(rng.normal(size=(6, 5)).astype(np.float32))
    table = keras.Variable(rng.normal(size=(9, 4)).astype(np.float32))
    optimizer.build([kernel, table])
    for step in range(steps):
        if step == 3:
            optimizer.learning_rate = 0.5 * float(optimizer.learning_rate)
        dense = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
        rows = tf.constant([1, 4, 4, 7])  # a repeated row: its gradients add up
        sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(4, 4)), tf.float32), rows, (9, 4))
        optimizer.apply([dense, sparse], [kernel, table])
    return [kernel.numpy(), table.numpy(), *(v.numpy() for v in optimizer.variables)]


def test_fused_adam_takes_the_steps_of_keras_adam():
    expected = trajectory(keras.optimizers.Adam(0.01))
    got = trajectory(FusedAdam(0.01))
    assert len(got) == len(expected)  # the same slot variables: checkpoints hold the same state
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # a few float32 ulps
    assert np.abs(expected[0] - trajectory(keras.optimizers.Adam(0.01), steps=0)[0]).max() > 0.01


def test_fused_adam_round_trips_through_a_saved_config():
    optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(FusedAdam(0.003)))
    assert isinstance(optimizer, FusedAdam)
    assert float(optimizer.learning_rate) == pytest.approx(0.003)
