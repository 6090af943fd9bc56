"""tf.data settings every pipeline shares: the training batches (data.py) and the images the
encoders decode (encoders.py). TensorFlow is imported inside, so importing this costs nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf


def without_autotuner(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuner and its background thread. Its rounds come further
    and further apart (the period doubles, past 20 s) and an iterator is released only when the
    thread next wakes up, so with it every epoch of `fit`, every evaluation and the end of a
    feature extraction came up to a period late: one 41 s epoch of the training benchmark held
    17-45 s of that wait (BENCHMARKS.md). Without it, AUTOTUNE means one parallel call per core
    and a prefetch buffer that grows while the consumer waits: as fast here."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
