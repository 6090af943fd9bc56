"""The merge model: image features + an RNN over the caption prefix, added, then dense layers.

Training graph (teacher forcing over whole captions):

    features (B, D) -> [feature_norm] -> image_dropout -> image_dense (relu)   -> (B, U)
    tokens   (B, T) -> embedding (mask_zero) -> text_dropout -> rnn (sequences) -> (B, T, U)
    merge: image broadcast over time + rnn output                              -> (B, T, U)
    -> decoder_dense (relu) -> logits (no softmax)                             -> (B, T, V)

Because the RNN is causal, logits[:, t] equals what the reference approach's one-prefix-per-sample
model outputs for the prefix tokens[:, :t+1] with the same weights (tests/test_model.py shows it).

Speed: the vocabulary projection and its softmax are most of the training cost, so `fit` and
`evaluate` (MergeModel.train_step/test_step) compute the output layer only at the N real target
positions of a batch, (N, U) -> (N, V), never at padding, fused with the loss
(output_cross_entropy). With an LSTM the layers before it also see only those N positions
(_packed_hidden, packed_lstm.py): a shuffled batch is about half padding. The loss is the
compiled one: cross-entropy averaged over real words. `predict` and `model(inputs)` still run the
functional graph (Keras' LSTM) and return logits at every position.

MergeDecoder at the bottom is this model's side of the decoder interface (models/decoder.py):
it reuses the trained layers, so decoding steps the RNN state one token at a time instead of
re-running the whole prefix per word. Layer names ("rnn", "logits", ...) are looked up only here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import keras
import numpy as np
from keras import layers, ops

from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.models import packed_lstm
from captioner.models.fused_adam import FusedAdam
from captioner.text import PAD_ID

RNN_LAYERS = {"lstm": layers.LSTM, "gru": layers.GRU}
# Keras mixed precision, per layer: float32 weights, bfloat16 matmuls in the dense layers (2-3x
# the float32 rate on CPUs with AVX512-BF16/AMX). The embedding and the RNN stay float32: on CPU
# their element-wise bfloat16 ops are slower than float32 ones. bfloat16 has float32's exponent
# range, so no loss scaling is needed.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
TINY = 1e-37  # floor for a softmax probability before its log (caps a word's loss at ~85)


@keras.saving.register_keras_serializable(package="captioner")
class MergeImageText(layers.Layer):
    """Adds the image vector (B, U) to every time step of the text sequence (B, T, U)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, image, sequence):
        return ops.expand_dims(image, 1) + sequence  # (B, T, U)

    def compute_mask(self, image, sequence, mask=None):
        return None  # the loss ignores padding by its target id, not through a Keras mask

    def compute_output_shape(self, image_shape, sequence_shape):
        return sequence_shape


def output_cross_entropy(hidden, kernel, bias, labels):
    """Mean cross-entropy of softmax(hidden @ kernel + bias) at `labels`: the output layer and
    the loss in one function, so the (N, V) logits are walked as few times as possible.

    hidden (N, U) in the layer's compute dtype, kernel (U, V), bias (V,), labels (N,) int.
    Same value and gradients as Dense + SparseCategoricalCrossentropy(from_logits=True) (tested),
    but the softmax is TF's oneDNN one (2.5x faster on CPU than its fused cross-entropy kernel),
    the bias add is fused into the matmul, and the backward pass reuses the saved probabilities
    (softmax - one_hot by a scatter of N values) for both matmuls and the bias gradient.
    """
    import tensorflow as tf

    labels = tf.cast(labels, tf.int32)
    # at least 1: under tf.distribute a replica can get an empty part of a small last batch
    count = tf.maximum(tf.cast(tf.shape(labels)[0], tf.float32), 1.0)
    at_labels = tf.stack([tf.range(tf.shape(labels)[0]), labels], axis=1)  # (N, 2)

    @tf.custom_gradient
    def fused(hidden, kernel, bias):
        weights = tf.cast(kernel, hidden.dtype)  # bfloat16 under mixed precision
        logits = tf.cast(tf.matmul(hidden, weights), tf.float32)  # (N, V)
        probabilities = tf.nn.softmax(tf.nn.bias_add(logits, bias))  # (N, V) float32
        picked = tf.maximum(tf.gather_nd(probabilities, at_labels), TINY)  # (N,)
        loss = -tf.reduce_sum(tf.math.log(picked)) / count

        def gradient(upstream):
            scale = upstream / count
            delta = tf.tensor_scatter_nd_sub(
                probabilities,
                at_labels,  # softmax - one_hot
                tf.ones_like(picked),
            )  # (N, V)
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


def image_vector(model: keras.Model, features, training: bool):
    """(B, D) features -> the image branch's (B, U) vector, in the dtype the merge layer adds
    it in: [feature_norm] -> image_dropout -> image_dense, the layers of build_model."""
    x = features
    if any(layer.name == "feature_norm" for layer in model.layers):
        x = model.get_layer("feature_norm")(x)
    x = model.get_layer("image_dropout")(x, training=training)
    return ops.cast(model.get_layer("image_dense")(x), model.get_layer("merge").compute_dtype)


@keras.saving.register_keras_serializable(package="captioner")
class MergeModel(keras.Model):
    """The functional merge model whose fit/evaluate skip the output layer at padding."""

    @functools.cached_property  # in __dict__, not a tracked sub-layer: it shares our layers
    def _hidden_model(self) -> keras.Model:
        """inputs -> decoder_dense output (B, T, U): everything below the output layer."""
        return keras.Model(self.inputs, self.get_layer("decoder_dense").output)

    def _loss(self, inputs, targets, training: bool):
        """The loss over the N non-padding targets of a batch, and N."""
        import tensorflow as tf

        if packed_lstm.supports(self.get_layer("rnn")):
            hidden, labels = self._packed_hidden(inputs, targets, training)
        else:  # a GRU: every layer over the padded batch, then the real positions
            hidden = self._hidden_model(inputs, training=training)  # (B, T, U)
            real = ops.not_equal(targets, PAD_ID)  # (B, T)
            hidden = tf.boolean_mask(hidden, real)  # (N, U)
            labels = tf.boolean_mask(targets, real)  # (N,)
        output = self.get_layer("logits")
        loss = output_cross_entropy(hidden, output.kernel, output.bias, labels)
        return loss, tf.shape(labels)[0]

    def _packed_hidden(self, inputs, targets, training: bool):
        """decoder_dense's output (N, U) and the targets (N,) at the N real positions only.

        The same layers and function as _hidden_model, but the text side runs on the batch packed
        (packed_lstm.py): the LSTM and the layers after it never compute a padding position,
        where _hidden_model's Keras LSTM steps every row to the longest caption (B x T, about
        twice N for shuffled batches). Positions after a caption's end cannot change earlier
        outputs (the LSTM is causal), so the real positions' values are the same.
        """
        import tensorflow as tf

        lengths = tf.reduce_sum(tf.cast(ops.not_equal(targets, PAD_ID), tf.int32), axis=1)  # (B,)
        packing = packed_lstm.pack(lengths)
        embedded = self.get_layer("embedding")(tf.gather_nd(inputs["tokens"], packing.index))
        embedded = self.get_layer("text_dropout")(embedded, training=training)  # (N, E)
        cell = self.get_layer("rnn").cell
        sequence = packed_lstm.lstm(
            embedded, packing, cell.kernel, cell.recurrent_kernel, cell.bias
        )  # (N, U)
        image = image_vector(self, inputs["features"], training)  # (B, U)
        merged = tf.gather(image, packing.index[:, 0]) + sequence  # MergeImageText, packed
        return self.get_layer("decoder_dense")(merged), tf.gather_nd(targets, packing.index)

    def _track_loss(self, loss, count):
        """Epoch loss = mean over words (each batch weighted by its N), not over batches."""
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=count)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        import tensorflow as tf

        # ({"features": (B, D), "tokens": (B, T)}, targets (B, T)); sample weights are not used
        inputs, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, count = self._loss(inputs, targets, training=True)
            # Under tf.distribute each replica's gradient is summed: average them.
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        weights = self.trainable_weights
        self.optimizer.apply(tape.gradient(scaled, weights), weights)
        return self._track_loss(loss, count)

    def test_step(self, data):
        inputs, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._track_loss(*self._loss(inputs, targets, training=False))


def build_model(
    feature_dim: int,
    vocab_size: int,
    cfg: ModelConfig,
    feature_mean: np.ndarray | None = None,
    feature_variance: np.ndarray | None = None,
    precision: str = "float32",
) -> keras.Model:
    """The training model: {"features": (B, D), "tokens": (B, T)} -> logits (B, T, V).

    precision "bfloat16" computes in bfloat16 with float32 weights (Keras mixed precision,
    set per layer, never globally); the logits are always float32.
    """
    if cfg.cell not in RNN_LAYERS:
        raise CaptionerError(f"model.cell must be one of {sorted(RNN_LAYERS)}, got '{cfg.cell}'")
    if precision not in PRECISIONS:
        raise CaptionerError(
            f"train.precision must be one of {sorted(PRECISIONS)}, got '{precision}'"
        )
    policy = PRECISIONS[precision]
    features = keras.Input((feature_dim,), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")

    x = features
    if cfg.normalize_features:
        if feature_mean is None or feature_variance is None:
            raise CaptionerError("model.normalize_features needs the training features' statistics")
        x = layers.Normalization(mean=feature_mean, variance=feature_variance, name="feature_norm")(
            x
        )
    x = layers.Dropout(cfg.dropout, name="image_dropout")(x)
    image = layers.Dense(cfg.units, activation="relu", name="image_dense", dtype=policy)(
        x
    )  # (B, U)

    embedded = layers.Embedding(vocab_size, cfg.embed_dim, mask_zero=True, name="embedding")(
        tokens
    )  # (B, T, E)
    embedded = layers.Dropout(cfg.dropout, name="text_dropout")(embedded)
    sequence = RNN_LAYERS[cfg.cell](cfg.units, return_sequences=True, name="rnn")(embedded)

    merged = MergeImageText(name="merge")(image, sequence)  # (B, T, U) float32
    hidden = layers.Dense(cfg.units, activation="relu", name="decoder_dense", dtype=policy)(merged)
    logits = layers.Dense(vocab_size, name="logits", dtype=policy)(hidden)  # (B, T, V)
    if precision != "float32":  # softmax and loss in float32, as Keras mixed precision advises
        logits = layers.Activation("linear", name="logits_float32", dtype="float32")(logits)
    return MergeModel({"features": features, "tokens": tokens}, logits, name="merge_model")


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam (Keras', each dense update one fused kernel: fused_adam.py) and cross-entropy on
    logits, ignoring padding targets (id 0). MergeModel's fit and evaluate compute this loss
    fused with the output layer, at non-padding targets only."""
    model.compile(
        optimizer=FusedAdam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID),
    )


# --- the decoder interface: one step at a time with the trained layers ---------------------------
class MergeDecoder:
    """The merge model as a decoder (models/decoder.py).

    State: (image (B, U), h (B, U)) for a GRU, (image, h, c) for an LSTM.

    The image vector rides in the state so that beam search may treat every part of the state
    alike (repeat per beam, gather per chosen hypothesis); it never changes between steps.
    """

    name = "merge"

    def __init__(self, model: keras.Model):
        self.model = model

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_layer("logits").units)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_layer("decoder_dense").units)

    def start(self, features) -> tuple:
        """(B, D) features -> the state before <start>: the image vector, as in inference (dropout
        off) and in the dtype the merge layer adds it in, and a zero RNN state."""
        model = self.model
        image = image_vector(model, features, training=False)
        rnn = model.get_layer("rnn")
        zeros = ops.zeros((ops.shape(features)[0], rnn.units), dtype=rnn.compute_dtype)
        return (image, zeros, zeros) if isinstance(rnn, layers.LSTM) else (image, zeros)

    def step(self, token_ids, state) -> tuple:
        """token ids (B,) and state -> (hidden (B, U), new state, None), through the Keras cell as
        in training; eager or inside any tf.function."""
        return self._step(token_ids, state, None)

    def step_fn(self) -> Callable:
        """`step` for a compiled decoding loop (call it while tracing): an LSTM's input projection
        is looked up per token (token_table) and the step is compiled by XLA, which fuses the
        gate arithmetic: about a fifth faster on CPU than the Keras cell (BENCHMARKS.md)."""
        import tensorflow as tf

        table = self._token_table()  # (V, 4U) for an LSTM, else None
        compiled = tf.function(self._step, jit_compile=True)
        return lambda token_ids, state: compiled(token_ids, state, table)

    def output_layer(self) -> tuple:
        """(kernel (U, V), bias (V,)) of the vocabulary projection: logits = hidden @ kernel + bias.
        decode.py projects onto only the ids a caption may contain."""
        layer = self.model.get_layer("logits")
        return layer.kernel, layer.bias

    def logits(self, hidden):
        """hidden (B, U) -> float32 logits (B, V) over the whole vocabulary."""
        return ops.cast(self.model.get_layer("logits")(hidden), "float32")

    def _token_table(self):
        """For an LSTM, the input half of its gates for every token: embedding @ kernel + bias,
        (V, 4U). A step then gathers one row per token instead of multiplying (B, E) by (E, 4U),
        a third of the step's matmul work. None for a GRU, which steps through its cell."""
        rnn = self.model.get_layer("rnn")
        if not isinstance(rnn, layers.LSTM):
            return None
        cell = rnn.cell
        table = ops.matmul(self.model.get_layer("embedding").embeddings, cell.kernel)
        return table + cell.bias if cell.use_bias else table

    def _step(self, token_ids, state, table):
        image, *rnn_state = state
        model = self.model
        if table is None:
            embedded = model.get_layer("embedding")(token_ids)  # (B, E)
            output, new_state = model.get_layer("rnn").cell(
                embedded, rnn_state if len(rnn_state) > 1 else rnn_state[0]
            )
            new_state = list(new_state) if isinstance(new_state, (list, tuple)) else [new_state]
        else:  # keras LSTMCell.call (implementation 2, no dropout at inference)
            cell = model.get_layer("rnn").cell
            h, c = rnn_state
            z = ops.take(table, token_ids, axis=0) + ops.matmul(h, cell.recurrent_kernel)  # (B, 4U)
            z_input, z_forget, z_cell, z_output = ops.split(z, 4, axis=1)
            c = cell.recurrent_activation(z_forget) * c + cell.recurrent_activation(
                z_input
            ) * cell.activation(z_cell)
            output = cell.recurrent_activation(z_output) * cell.activation(c)
            new_state = [output, c]
        hidden = model.get_layer("decoder_dense")(image + output)  # (B, U)
        return hidden, (image, *new_state), None
