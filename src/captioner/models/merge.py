"""The merge model: image features + an RNN over the caption prefix, added, then dense layers.

Training graph (teacher forcing over whole captions):

    features (B, D) -> [feature_norm] -> image_dropout -> image_dense (relu)   -> (B, U)
    tokens   (B, T) -> embedding (mask_zero) -> text_dropout -> rnn (sequences) -> (B, T, U)
    merge: image broadcast over time + rnn output                              -> (B, T, U)
    -> decoder_dense (relu) -> logits (no softmax)                             -> (B, T, V)

Because the RNN is causal, logits[:, t] equals what the reference approach's one-prefix-per-sample
model outputs for the prefix tokens[:, :t+1] with the same weights (tests/test_model.py shows it).

Speed: `fit` and `evaluate` compute the output layer only at the real target positions of a
batch, fused with the loss (models/shared.py: FusedOutputModel, output_cross_entropy). With an
LSTM the layers below it see only those positions too (_packed_hidden, packed_lstm.py): a
shuffled batch is about half padding. The loss is the compiled one: cross-entropy averaged over
real words. `predict` and `model(inputs)` still run the functional graph (Keras' LSTM) and
return logits at every position.

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
from captioner.models.shared import (
    FusedOutputModel,
    OutputDecoder,
    compile_model,
    lstm_update,
    output_cross_entropy,
    policy,
)
from captioner.text import PAD_ID

__all__ = ["FEATURES", "MergeDecoder", "MergeModel", "build_model", "compile_model"]

RNN_LAYERS = {"lstm": layers.LSTM, "gru": layers.GRU}
FEATURES = "pooled"  # one vector per image (B, D); a grid cache arrives as its mean over regions


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


def image_vector(model: keras.Model, features, training: bool):
    """(B, D) features -> the image branch's (B, U) vector, in the dtype the merge layer adds
    it in: [feature_norm] -> image_dropout -> image_dense, the layers of build_model."""
    x = features
    if any(layer.name == "feature_norm" for layer in model.layers):
        x = model.get_layer("feature_norm")(x)
    x = model.get_layer("image_dropout")(x, training=training)
    return ops.cast(model.get_layer("image_dense")(x), model.get_layer("merge").compute_dtype)


@keras.saving.register_keras_serializable(package="captioner")
class MergeModel(FusedOutputModel):
    """The functional merge model whose fit/evaluate skip the output layer at padding."""

    @functools.cached_property  # in __dict__, not a tracked sub-layer: it shares our layers
    def _hidden_model(self) -> keras.Model:
        """inputs -> decoder_dense output (B, T, U): everything below the output layer."""
        return keras.Model(self.inputs, self.get_layer("decoder_dense").output)

    def _loss_terms(self, inputs, targets, training: bool):
        """The cross-entropy over the N non-padding targets of a batch (also the objective), N."""
        import tensorflow as tf

        if packed_lstm.supports(self.get_layer("rnn")):
            hidden, labels = self._packed_hidden(inputs, targets, training)
        else:  # a GRU: every layer over the padded batch, then the real positions
            hidden = self._hidden_model(inputs, training=training)  # (B, T, U)
            real = ops.not_equal(targets, PAD_ID)  # (B, T)
            hidden = tf.boolean_mask(hidden, real)  # (N, U)
            labels = tf.boolean_mask(targets, real)  # (N,)
        output = self.get_layer("logits")
        loss = output_cross_entropy(
            hidden, output.kernel, output.bias, labels, self.label_smoothing
        )
        return loss, loss, tf.shape(labels)[0]

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
        sequence = packed_lstm.lstm_layer(self.get_layer("rnn"), embedded, packing)  # (N, U)
        image = image_vector(self, inputs["features"], training)  # (B, U)
        merged = tf.gather(image, packing.index[:, 0]) + sequence  # MergeImageText, packed
        return self.get_layer("decoder_dense")(merged), tf.gather_nd(targets, packing.index)


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
    dense_policy = policy(precision)
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
    image = layers.Dense(cfg.units, activation="relu", name="image_dense", dtype=dense_policy)(
        x
    )  # (B, U)

    embedded = layers.Embedding(vocab_size, cfg.embed_dim, mask_zero=True, name="embedding")(
        tokens
    )  # (B, T, E)
    embedded = layers.Dropout(cfg.dropout, name="text_dropout")(embedded)
    sequence = RNN_LAYERS[cfg.cell](cfg.units, return_sequences=True, name="rnn")(embedded)

    merged = MergeImageText(name="merge")(image, sequence)  # (B, T, U) float32
    hidden = layers.Dense(cfg.units, activation="relu", name="decoder_dense", dtype=dense_policy)(
        merged
    )
    logits = layers.Dense(vocab_size, name="logits", dtype=dense_policy)(hidden)  # (B, T, V)
    if precision != "float32":  # softmax and loss in float32, as Keras mixed precision advises
        logits = layers.Activation("linear", name="logits_float32", dtype="float32")(logits)
    return MergeModel({"features": features, "tokens": tokens}, logits, name="merge_model")


# --- the decoder interface: one step at a time with the trained layers ---------------------------
class MergeDecoder(OutputDecoder):
    """The merge model as a decoder (models/decoder.py).

    State: ((image (B, U),), (h (B, U),)) for a GRU, ((image,), (h, c)) for an LSTM, where
    image is the image's half of decoder_dense, image_vector @ kernel + bias, computed once:
    it never changes between steps, the RNN state does. Each step adds the RNN output's half,
    output @ kernel, and applies the activation: decoder_dense(image_vector + output), split
    (equal up to rounding). Split, an int8 export (dynamic-range TFLite) rounds the RNN output
    on its own scale rather than on the image vector's, which is ten times wider (ReLU values
    up to ~10 against the LSTM's +-1 on real photographs): it keeps 85% of the greedy captions
    of real dev images instead of 81% (BENCHMARKS.md, "Export").
    """

    name = "merge"
    regions = None  # no attention

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_layer("decoder_dense").units)

    def start(self, features) -> tuple:
        """(B, D) features -> the state before <start>: the image's half of decoder_dense (of
        the image vector as in inference: dropout off), and a zero RNN state."""
        model = self.model
        dense = model.get_layer("decoder_dense")
        image = self._project(image_vector(model, features, training=False))
        image = image + ops.cast(dense.bias, dense.compute_dtype)  # (B, U)
        rnn = model.get_layer("rnn")
        zeros = ops.zeros((ops.shape(features)[0], rnn.units), dtype=rnn.compute_dtype)
        return (image,), ((zeros, zeros) if isinstance(rnn, layers.LSTM) else (zeros,))

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
        (image,), rnn_state = state
        model = self.model
        if table is None:
            embedded = model.get_layer("embedding")(token_ids)  # (B, E)
            output, new_state = model.get_layer("rnn").cell(
                embedded, rnn_state if len(rnn_state) > 1 else rnn_state[0]
            )
            new_state = tuple(new_state) if isinstance(new_state, (list, tuple)) else (new_state,)
        else:  # keras LSTMCell.call (implementation 2, no dropout at inference)
            cell = model.get_layer("rnn").cell
            h, c = rnn_state
            z = ops.take(table, token_ids, axis=0) + ops.matmul(h, cell.recurrent_kernel)  # (B, 4U)
            output, c = lstm_update(z, c, cell.activation, cell.recurrent_activation)
            new_state = (output, c)
        # output (B*K, U) for K hypotheses per image (beam search), image (B, U)
        units = image.shape[-1]
        text = ops.reshape(self._project(output), (ops.shape(image)[0], -1, units))  # (B, K, U)
        activation = model.get_layer("decoder_dense").activation
        hidden = activation(ops.reshape(image[:, None] + text, (-1, units)))  # (B*K, U)
        return hidden, ((image,), new_state), None

    def _project(self, x):
        """x (B, U) @ decoder_dense's kernel, in the layer's compute dtype, as the layer does."""
        dense = self.model.get_layer("decoder_dense")
        dtype = dense.compute_dtype
        return ops.matmul(ops.cast(x, dtype), ops.cast(dense.kernel, dtype))
