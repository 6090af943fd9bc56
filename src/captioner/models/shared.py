"""What every decoder shares: its vocabulary output layer's training loss fused with it, the
train/test steps that compute it only at real targets, the precision policies, the inference
side of the layer named "logits", and one LSTM step from its gate pre-activations.

Shapes: N real (non-padding) targets of a batch, U the width the output layer reads, V words.

Speed: the vocabulary projection and its softmax are most of a caption model's training cost, so
`fit` and `evaluate` (FusedOutputModel.train_step/test_step) compute the output layer only at
the N real target positions of a batch, (N, U) -> (N, V), never at padding, fused with the loss
(output_cross_entropy). `predict` and `model(inputs)` still return logits at every position.
"""

from __future__ import annotations

import keras
from keras import ops

from captioner.errors import CaptionerError
from captioner.models.fused_adam import FusedAdam
from captioner.text import PAD_ID

# Keras mixed precision, per layer: float32 weights, bfloat16 matmuls in the dense layers (2-3x
# the float32 rate on CPUs with AVX512-BF16/AMX). Embeddings and recurrent loops stay float32:
# on CPU their element-wise bfloat16 ops are slower than float32 ones. bfloat16 has float32's
# exponent range, so no loss scaling is needed.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
TINY = 1e-37  # floor for a softmax probability before its log (caps a word's loss at ~85)


def policy(precision: str) -> str:
    """The Keras dtype policy of the dense layers for train.precision; one line if unknown."""
    if precision not in PRECISIONS:
        raise CaptionerError(
            f"train.precision must be one of {sorted(PRECISIONS)}, got '{precision}'"
        )
    return PRECISIONS[precision]


def output_cross_entropy(hidden, kernel, bias, labels, smoothing: float = 0.0):
    """Mean cross-entropy of softmax(hidden @ kernel + bias) at `labels`: the output layer and
    the loss in one function, so the (N, V) logits are walked as few times as possible.

    hidden (N, U) in the layer's compute dtype, kernel (U, V), bias (V,), labels (N,) int.
    Same value and gradients as Dense + SparseCategoricalCrossentropy(from_logits=True) (tested),
    but the softmax is TF's oneDNN one (2.5x faster on CPU than its fused cross-entropy kernel),
    the bias add is fused into the matmul, and the backward pass reuses the saved probabilities
    (softmax - one_hot by a scatter of N values) for both matmuls and the bias gradient.

    `smoothing` e > 0: label smoothing, the cross-entropy against (1 - e) one_hot + e / V (as
    keras' CategoricalCrossentropy(label_smoothing=e), tested). Per word that is
    -log p_y + e (z_y - mean_v z_v) for the logits z, and the gradient p - (1 - e) one_hot - e / V.
    """
    import tensorflow as tf

    labels = tf.cast(labels, tf.int32)
    # at least 1: under tf.distribute a replica can get an empty part of a small last batch
    count = tf.maximum(tf.cast(tf.shape(labels)[0], tf.float32), 1.0)
    at_labels = tf.stack([tf.range(tf.shape(labels)[0]), labels], axis=1)  # (N, 2)

    @tf.custom_gradient
    def fused(hidden, kernel, bias):
        weights = tf.cast(kernel, hidden.dtype)  # bfloat16 under mixed precision
        logits = tf.nn.bias_add(tf.cast(tf.matmul(hidden, weights), tf.float32), bias)  # (N, V)
        probabilities = tf.nn.softmax(logits)  # (N, V) float32
        picked = tf.maximum(tf.gather_nd(probabilities, at_labels), TINY)  # (N,)
        loss = -tf.reduce_sum(tf.math.log(picked))
        if smoothing:
            spread = tf.gather_nd(logits, at_labels) - tf.reduce_mean(logits, axis=1)  # (N,)
            loss += smoothing * tf.reduce_sum(spread)
        loss /= count

        def gradient(upstream):
            scale = upstream / count
            delta = tf.tensor_scatter_nd_sub(  # softmax - (1 - e) one_hot - e / V
                probabilities, at_labels, tf.fill(tf.shape(picked), 1.0 - smoothing)
            )  # (N, V)
            if smoothing:
                delta -= smoothing / tf.cast(tf.shape(logits)[1], tf.float32)
            delta_compute = tf.cast(delta, hidden.dtype)
            d_hidden = tf.matmul(delta_compute, weights, transpose_b=True)  # (N, U)
            d_kernel = tf.matmul(hidden, delta_compute, transpose_a=True)  # (U, V)
            return (
                d_hidden * tf.cast(scale, hidden.dtype),
                tf.cast(d_kernel, kernel.dtype) * scale,
                tf.reduce_sum(delta, axis=0) * scale,
            )

        return loss, gradient

    return fused(hidden, tf.convert_to_tensor(kernel), tf.convert_to_tensor(bias))


class FusedOutputModel(keras.Model):
    """A functional caption model whose fit/evaluate skip the output layer ("logits") at padding.

    Each decoder's subclass says what its loss is in `_loss_terms(inputs, targets, training)` ->
    (objective, cross-entropy, N): the objective is what training minimises (the cross-entropy
    plus any regulariser of that decoder), the cross-entropy over the N real targets is what is
    reported as "loss" and "val_loss", so losses stay comparable between decoders.

    `label_smoothing` (train.label_smoothing, set by train.py on a built or loaded model) smooths
    that cross-entropy, in training and in the reported losses alike: early stopping and the
    best checkpoint watch the smoothed dev loss, the setting measured on Flickr8k dev.
    """

    label_smoothing = 0.0

    def _loss_terms(self, inputs, targets, training: bool) -> tuple:
        raise NotImplementedError

    def _track_loss(self, loss, count):
        """Epoch loss = mean over words (each batch weighted by its N), not over batches."""
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=count)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        import tensorflow as tf

        # ({"features", "tokens": (B, T)}, targets (B, T)); sample weights are not used
        inputs, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            objective, loss, count = self._loss_terms(inputs, targets, training=True)
            # Under tf.distribute each replica's gradient is summed: average them.
            scaled = objective / tf.distribute.get_strategy().num_replicas_in_sync
        weights = self.trainable_weights
        self.optimizer.apply(tape.gradient(scaled, weights), weights)
        return self._track_loss(loss, count)

    def test_step(self, data):
        inputs, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        _, loss, count = self._loss_terms(inputs, targets, training=False)
        return self._track_loss(loss, count)


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam (Keras', each dense update one fused kernel: fused_adam.py) and cross-entropy on
    logits, ignoring padding targets (id 0). FusedOutputModel's fit and evaluate compute this
    loss fused with the output layer, at non-padding targets only."""
    model.compile(
        optimizer=FusedAdam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID),
    )


def lstm_gates(z, activation=ops.tanh, recurrent_activation=ops.sigmoid) -> tuple:
    """An LSTM's gate pre-activations z (B, 4U), in Keras' gate order (input, forget, cell,
    output) -> the gates after their activations (i, f, g, o), each (B, U)."""
    z_input, z_forget, z_cell, z_output = ops.split(z, 4, axis=-1)
    return (
        recurrent_activation(z_input),
        recurrent_activation(z_forget),
        activation(z_cell),
        recurrent_activation(z_output),
    )


def lstm_update(z, c, activation=ops.tanh, recurrent_activation=ops.sigmoid) -> tuple:
    """One LSTM step from its gate pre-activations z (B, 4U) and the previous cell state c (B, U)
    -> (h, c), as keras' LSTMCell computes them (implementation 2, no dropout at inference)."""
    i, f, g, o = lstm_gates(z, activation, recurrent_activation)
    c = f * c + i * g
    return o * activation(c), c


class OutputDecoder:
    """The inference side of the output layer, shared by every decoder's Decoder class."""

    def __init__(self, model: keras.Model):
        self.model = model

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_layer("logits").units)

    def output_layer(self) -> tuple:
        """(kernel (U, V), bias (V,)) of the vocabulary projection: logits = hidden @ kernel + bias.
        decode.py projects onto only the ids a caption may contain."""
        layer = self.model.get_layer("logits")
        return layer.kernel, layer.bias

    def logits(self, hidden):
        """hidden (B, U) -> float32 logits (B, V) over the whole vocabulary."""
        return ops.cast(self.model.get_layer("logits")(hidden), "float32")
