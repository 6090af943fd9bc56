"""tf.distribute for `captioner train --strategy default|mirrored|multiworker`.

The global batch is cfg.train.batch_size whatever the strategy: each of R replicas computes
batch/R captions and the gradients are averaged (see docs/TRAINING.md for scaling rules).
Multi-worker runs read the cluster from TF_CONFIG; only the chief writes the run directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import keras

from captioner.errors import CaptionerError
from captioner.io import log

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str):
    """default | mirrored (all local GPUs, else all logical CPUs) | multiworker (TF_CONFIG).

    Call before any other TensorFlow work: a multi-worker strategy must configure the runtime.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise CaptionerError(
                "--strategy multiworker reads the cluster from the TF_CONFIG "
                "environment variable, which is not set (see docs/TRAINING.md)"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise CaptionerError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got '{name}'")


def is_chief(strategy: str) -> bool:
    """False only for a multiworker task that is not the chief (worker 0 when there is none).

    Read from TF_CONFIG, so it is known before TensorFlow starts.
    """
    if strategy != "multiworker":
        return True
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    except (json.JSONDecodeError, AttributeError):
        raise CaptionerError("TF_CONFIG: not a JSON object with 'cluster' and 'task'") from None
    if task.get("type") in (None, "chief"):
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in cluster


def shard_by_data(dataset):
    """Each worker takes its part of every global batch (in-memory data has no files to shard)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def fit_multiworker(
    strategy: Any,
    model: keras.Model,
    train_data,
    dev_data,
    epochs: int,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    """model.fit's epoch loop for MultiWorkerMirroredStrategy, with the model's own steps.

    Keras 3 fit() fails under this strategy (keras-team/keras#20329, #20585: it reduces nested
    input batches and scalar logs with collectives that do not accept them), so this loop runs
    model.train_step / test_step per replica and averages the logged losses over workers.
    `callbacks` get fit's train- and epoch-level hooks (not the per-batch ones), with the
    averaged "loss" and "val_loss", so Keras' TensorBoard callback works here too.
    """
    import tensorflow as tf

    with strategy.scope():
        model.optimizer.build(model.trainable_variables)  # in cross-replica context, before steps
        train_batches = strategy.experimental_distribute_dataset(shard_by_data(train_data))
        dev_batches = strategy.experimental_distribute_dataset(shard_by_data(dev_data))
    # batches differ in shape (bucketing); one trace for all: (None, D), (None, None) specs
    train_step = tf.function(
        lambda batch: strategy.run(model.train_step, args=(batch,)),
        input_signature=[train_batches.element_spec],
    )
    test_step = tf.function(
        lambda batch: strategy.run(model.test_step, args=(batch,)),
        input_signature=[dev_batches.element_spec],
    )
    hooks = keras.callbacks.CallbackList(callbacks, model=model)
    hooks.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        hooks.on_epoch_begin(epoch)
        logs = {
            "loss": _run_epoch(strategy, model, train_step, train_batches),
            "val_loss": _run_epoch(strategy, model, test_step, dev_batches),
        }
        log(
            f"epoch {epoch + 1}/{epochs} - loss: {logs['loss']:.4f} - "
            f"val_loss: {logs['val_loss']:.4f}"
        )
        hooks.on_epoch_end(epoch, logs)  # outside the scope: saving creates no collectives
        if model.stop_training:
            break
    hooks.on_train_end()


def _run_epoch(strategy: Any, model: keras.Model, step, batches) -> float:
    """Run `step` over every batch; the loss averaged over all workers (the same on each, so
    every worker takes the same early-stopping decision)."""
    model.reset_metrics()
    logs: dict = {}
    for batch in batches:
        logs = step(batch)
    return float(strategy.reduce("MEAN", logs["loss"], axis=None))  # a collective: all workers
