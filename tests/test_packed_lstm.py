"""The packed LSTM (models/packed_lstm.py): its layout, and the same outputs and gradients as
Keras' LSTM at every real position, on one device and under tf.distribute."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.models import packed_lstm

EMBED, UNITS = 16, 32


def test_pack_lays_out_the_rows_step_by_step_longest_first():
    packing = packed_lstm.pack([2, 4, 1, 4])  # rows by length: 1, 3 (ties keep their order), 0, 2
    np.testing.assert_array_equal(packing.sizes, [4, 3, 2, 2])
    steps = [[(1, 0), (3, 0), (0, 0), (2, 0)], [(1, 1), (3, 1), (0, 1)], [(1, 2), (3, 2)]]
    steps.append([(1, 3), (3, 3)])
    np.testing.assert_array_equal(packing.index, [pair for step in steps for pair in step])
    # one step earlier in the packed layout; 11 (= N) is the zero initial state
    np.testing.assert_array_equal(packing.previous, [11, 11, 11, 11, 0, 1, 2, 4, 5, 7, 8])


def keras_lstm(seed: int = 0) -> keras.layers.LSTM:
    """A Keras LSTM with random weights (a non-zero bias too), as build_model makes it."""
    keras.utils.set_random_seed(seed)
    layer = keras.layers.LSTM(UNITS, return_sequences=True)
    layer.build((None, None, EMBED))
    layer.cell.bias.assign(np.random.default_rng(seed).normal(0, 0.5, 4 * UNITS))
    return layer


def losses_and_gradients(layer, inputs, lengths, weights):
    """Keras' and the packed LSTM's sum(h * weights) over the real positions, each with its
    gradients with respect to the padded inputs and the layer's kernel, recurrent kernel, bias."""
    inputs = tf.convert_to_tensor(inputs)
    mask = tf.sequence_mask(lengths, inputs.shape[1])
    cell = layer.cell
    variables = [cell.kernel, cell.recurrent_kernel, cell.bias]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        padded = layer(inputs, mask=mask)  # (B, T, U)
        keras_loss = tf.reduce_sum(tf.where(mask[..., None], padded * weights, 0.0))
        packing = packed_lstm.pack(lengths)
        packed = packed_lstm.lstm(tf.gather_nd(inputs, packing.index), packing, *variables)
        packed_loss = tf.reduce_sum(packed * tf.gather_nd(weights, packing.index))
    sources = [inputs, *variables]
    return (
        (keras_loss, tape.gradient(keras_loss, sources), tf.gather_nd(padded, packing.index)),
        (packed_loss, tape.gradient(packed_loss, sources), packed),
    )


@pytest.mark.parametrize(
    "lengths",
    [[3, 9, 1, 9, 5, 2, 7, 1], [6, 6, 6], [3], [12, 1]],
    ids=["mixed", "equal", "one-row", "long-and-one"],
)
def test_packed_lstm_has_keras_outputs_and_gradients(lengths):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(len(lengths), max(lengths) + 2, EMBED)).astype(np.float32)
    weights = rng.normal(size=(*inputs.shape[:2], UNITS)).astype(np.float32)
    (keras_loss, expected, keras_h), (loss, gradients, h) = losses_and_gradients(
        keras_lstm(), inputs, lengths, weights
    )
    assert h.shape == (sum(lengths), UNITS)
    np.testing.assert_allclose(h, keras_h, atol=1e-5)
    assert float(loss) == pytest.approx(float(keras_loss), rel=1e-5)
    names = ["inputs", "kernel", "recurrent", "bias"]
    for name, got, want in zip(names, gradients, expected, strict=True):
        want = tf.convert_to_tensor(want).numpy()
        assert np.abs(want).max() > 1e-3, name  # a real gradient, not zeros on both sides
        np.testing.assert_allclose(
            got, want, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=name
        )


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients():
    """Under tf.distribute a replica can get no rows of a small last batch (Keras' own LSTM
    fails on that; the packed one must not)."""
    cell = keras_lstm().cell
    variables = [cell.kernel, cell.recurrent_kernel, cell.bias]
    inputs = tf.zeros((0, EMBED))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        h = packed_lstm.lstm(inputs, packed_lstm.pack(tf.zeros(0, tf.int32)), *variables)
        loss = tf.reduce_sum(h)
    gradients = tape.gradient(loss, [inputs, *variables])
    assert h.shape == (0, UNITS)
    for got, source in zip(gradients, [inputs, *variables], strict=True):
        assert got.shape == source.shape and not np.any(got)


def test_only_plain_keras_lstms_are_packed():
    lstm = keras.layers.LSTM(UNITS, return_sequences=True)
    assert packed_lstm.supports(lstm)
    assert not packed_lstm.supports(keras.layers.GRU(UNITS, return_sequences=True))
    assert not packed_lstm.supports(keras.layers.LSTM(UNITS, recurrent_dropout=0.1))
    assert not packed_lstm.supports(keras.layers.LSTM(UNITS, activation="relu"))
    assert not packed_lstm.supports(keras.layers.LSTM(UNITS, go_backwards=True))


MIRRORED = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import test_packed_lstm as here

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(2)
    lengths = np.array([4, 1, 7, 3, 7, 2], np.int32)
    inputs = rng.normal(size=(6, 9, here.EMBED)).astype(np.float32)
    weights = rng.normal(size=(6, 9, here.UNITS)).astype(np.float32)
    with strategy.scope():
        layer = here.keras_lstm()
    data = tf.data.Dataset.from_tensors((inputs, lengths, weights))
    batch = next(iter(strategy.experimental_distribute_dataset(data)))

    def replica(inputs, lengths, weights):
        (keras_loss, expected, _), (loss, gradients, _) = here.losses_and_gradients(
            layer, inputs, lengths, weights
        )
        return [loss - keras_loss] + [
            tf.reduce_max(tf.abs(tf.convert_to_tensor(a) - tf.convert_to_tensor(b)))
            for a, b in zip(gradients, expected, strict=True)
        ]

    per_replica = strategy.run(tf.function(replica), args=batch)
    differences = [
        max(abs(float(v)) for v in strategy.experimental_local_results(part))
        for part in per_replica
    ]
    print(strategy.num_replicas_in_sync, max(differences))
    """
)


@pytest.mark.slow  # a subprocess: logical devices must be set before TensorFlow starts
def test_packed_lstm_matches_keras_on_every_replica_under_mirrored_strategy():
    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, tests], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    replicas, difference = result.stdout.split()
    assert int(replicas) == 2 and float(difference) < 1e-5
