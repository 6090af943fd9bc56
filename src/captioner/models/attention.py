"""The attention model: Show, Attend and Tell's soft attention (Xu et al. 2015) over a grid of
image regions, an LSTM, and a deep output layer. docs/ATTENTION.md has the design and its sources.

Training graph (teacher forcing over whole captions; L = H * W regions of C channels):

    features (B, H, W, C) -> reshape (B, L, C) -> [feature_norm]               regions a_i
    mean over regions -> init_h, init_c (tanh)                                 h_0, c_0 (B, U)
    tokens (B, T) -> embedding                                                 E y_{t-1} (B, T, E)
    attention_lstm, at every step t (AttentionLSTM below):
        alpha_t = softmax_i(w . tanh(W_a a_i + W_h h_{t-1}))                   (B, L)
        z_t = sigmoid(w_beta . h_{t-1}) * sum_i alpha_ti a_i      (gated context, B, C)
        h_t, c_t = LSTM([E y_{t-1}, z_t], h_{t-1}, c_{t-1})                   (B, U)
    deep output: tanh(E y_{t-1} + output_hidden(dropout(h_t)) + output_context(z_t))  (B, T, E)
    -> output_dropout -> logits                                                (B, T, V)

The training objective adds the doubly stochastic regularisation to the cross-entropy:
lambda * sum_i (1 - sum_t alpha_ti)^2 per caption (t over its real positions), summed over the
batch and divided by its N real words like the cross-entropy (so lambda weighs it against the
cross-entropy of a caption as in the paper). "loss" and "val_loss" report the cross-entropy
alone, comparable with the merge model's.

Speed: `fit` computes everything from the words on only at the N real positions, packed as the
merge model's LSTM packs them (models/packed_lstm.py); the regions' projection W_a a_i (B, L, A)
and the words' share of the LSTM gates (N, 4U) are computed once per batch, outside the loop;
the loop runs only on the captions still going and has a hand-written backward pass
(models/attention_loop.py, which holds the step's arithmetic); the vocabulary is fused with the
loss (models/shared.py).

AttentionDecoder at the bottom is this model's side of the decoder interface (models/decoder.py):
the same step function as training, one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import layers, ops

from captioner.config import ModelConfig
from captioner.errors import CaptionerError
from captioner.models import attention_loop, packed_lstm
from captioner.models.shared import (
    FusedOutputModel,
    OutputDecoder,
    compile_model,
    output_cross_entropy,
    policy,
)
from captioner.text import PAD_ID

__all__ = ["FEATURES", "AttentionDecoder", "AttentionModel", "build_model", "compile_model"]

FEATURES = "grid"  # a grid of region vectors per image (models/decoder.py)


@keras.saving.register_keras_serializable(package="captioner")
class AttentionLSTM(layers.Layer):
    """An LSTM that attends over the image regions at every step (see the module docstring).

    call(embedded (B, T, E), regions (B, L, C), h0 (B, U), c0 (B, U), tokens (B, T)) ->
        hidden h_t (B, T, U), context z_t (B, T, C), attention alpha_t (B, T, L); tokens only
        say where each caption ends (<pad> after it), which are zeros in the outputs.
    Float32 throughout: its work is many small steps, where bfloat16 is slower on CPU.
    `doubly_stochastic` is the weight lambda of the regulariser on alpha, which AttentionModel's
    loss applies; it is kept here so the saved model carries it.
    """

    def __init__(self, units: int, attention_units: int, doubly_stochastic: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.attention_units = int(units), int(attention_units)
        self.doubly_stochastic = float(doubly_stochastic)

    def build(self, embedded_shape, regions_shape, h0_shape=None, c0_shape=None, tokens_shape=None):
        embed, channels = embedded_shape[-1], regions_shape[-1]
        units, attention = self.units, self.attention_units

        def weight(name, shape, initializer="glorot_uniform"):
            return self.add_weight(name=name, shape=shape, initializer=initializer)

        # LSTM gates (Keras' order: input, forget, cell, output) from the word, the context and h
        self.input_kernel = weight("input_kernel", (embed, 4 * units))
        self.context_kernel = weight("context_kernel", (channels, 4 * units))
        self.recurrent_kernel = weight("recurrent_kernel", (units, 4 * units), "orthogonal")
        forget_one = np.zeros(4 * units, np.float32)
        forget_one[units : 2 * units] = 1.0  # Keras' unit_forget_bias
        self.bias = weight("bias", (4 * units,), keras.initializers.Constant(forget_one))
        # attention: scores w . tanh(W_a a_i + b + W_h h)
        self.region_kernel = weight("region_kernel", (channels, attention))
        self.attention_bias = weight("attention_bias", (attention,), "zeros")
        self.hidden_kernel = weight("hidden_kernel", (units, attention))
        self.score_kernel = weight("score_kernel", (attention, 1))
        # the gate beta on the context: sigmoid(h . w_beta + b)
        self.gate_kernel = weight("gate_kernel", (units, 1))
        self.gate_bias = weight("gate_bias", (1,), "zeros")

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "attention_units": self.attention_units,
            "doubly_stochastic": self.doubly_stochastic,
        }

    # --- the pieces decoding shares ---------------------------------------------------------------
    def project_regions(self, regions):
        """regions (B, L, C) -> W_a a_i + b (B, L, A): once per image, not per step."""
        return ops.matmul(regions, self.region_kernel) + self.attention_bias

    def token_gates(self, embedded):
        """embedded words (..., E) -> their share of the LSTM gates (..., 4U), bias included."""
        return ops.matmul(embedded, self.input_kernel) + self.bias

    def step_weights(self) -> attention_loop.Weights:
        """The weights a step reads; the recurrent, attention and gate kernels side by side
        (U, 4U + A + 1), so h_{t-1} is multiplied once per step for all three."""
        recurrent = ops.concatenate(
            [self.recurrent_kernel, self.hidden_kernel, self.gate_kernel], axis=1
        )
        return attention_loop.Weights(
            recurrent, self.context_kernel, self.score_kernel, self.gate_bias
        )

    def step(self, gates_in, h, c, regions, projected, weights) -> tuple:
        """One step: the word's gate share (R, 4U), h, c (R, U), regions (B, L, C), projected
        (B, L, A), weights = step_weights() -> (h, c, context z (R, C), alpha (R, L)).

        R = B * K rows: K hypotheses per image (beam search), rows b * K ... b * K + K - 1 of
        image b, so an image's regions are read once for all its beams (attention_loop.step).
        """
        out = attention_loop.step(gates_in, h, c, regions, projected, weights)
        return out["h"], out["c"], out["context"], out["alpha"]

    # --- training: whole captions ------------------------------------------------------------
    def packed(self, embedded, regions, h0, c0, packing: packed_lstm.Packing) -> tuple:
        """The loop over whole captions on their real positions only (attention_loop.captions):
        embedded (N, E) packed by `packing`; regions (B, L, C), h0, c0 (B, U) in batch order.
        -> h (N, U), context z (N, C), alpha (N, L), packed."""
        import tensorflow as tf

        rows = attention_loop.first_rows(packing)
        regions = tf.gather(regions, rows)
        # once per batch: the regions' attention projection and all words' share of the gates
        return attention_loop.captions(
            self.token_gates(embedded),  # (N, 4U)
            regions,
            self.project_regions(regions),  # (B, L, A)
            tf.gather(h0, rows),
            tf.gather(c0, rows),
            packing,
            self.step_weights(),
        )

    def call(self, embedded, regions, h0, c0, tokens):
        """`packed` on the real positions of the padded batch (tokens != <pad>): past its end a
        caption's positions are not computed at all and its outputs there are zeros."""
        import tensorflow as tf

        packing = packed_lstm.pack(tf.reduce_sum(tf.cast(tokens != PAD_ID, tf.int32), axis=1))
        outputs = self.packed(tf.gather_nd(embedded, packing.index), regions, h0, c0, packing)
        padded = tf.shape(tokens)
        # (B, T, U), (B, T, C), (B, T, L)
        return tuple(
            tf.scatter_nd(packing.index, packed, tf.concat([padded, tf.shape(packed)[1:]], 0))
            for packed in outputs
        )

    def compute_output_shape(
        self, embedded_shape, regions_shape, h0_shape=None, c0_shape=None, tokens_shape=None
    ):
        batch, steps = embedded_shape[0], embedded_shape[1]
        return (
            (batch, steps, self.units),
            (batch, steps, regions_shape[-1]),
            (batch, steps, regions_shape[1]),
        )


@keras.saving.register_keras_serializable(package="captioner")
class AttentionModel(FusedOutputModel):
    """The functional attention model; its training objective adds the doubly stochastic
    regulariser, and fit/evaluate compute the output layers only at real targets."""

    def _loss_terms(self, inputs, targets, training: bool):
        """(cross-entropy + lambda * regulariser / N, cross-entropy, N) over the N real targets:
        everything from the words on is computed on packed real positions only."""
        import tensorflow as tf

        real = ops.not_equal(targets, PAD_ID)  # (B, T)
        packing = packed_lstm.pack(tf.reduce_sum(tf.cast(real, tf.int32), axis=1))
        regions, h0, c0 = image_state(self, inputs["features"])
        embedded = self.get_layer("embedding")(tf.gather_nd(inputs["tokens"], packing.index))
        cell = self.get_layer("attention_lstm")
        hidden, context, alpha = cell.packed(embedded, regions, h0, c0, packing)  # (N, ...)
        deep = deep_output(self, embedded, hidden, context, training)  # (N, E)
        labels = tf.gather_nd(targets, packing.index)  # (N,)
        output = self.get_layer("logits")
        loss = output_cross_entropy(deep, output.kernel, output.bias, labels, self.label_smoothing)
        count = tf.shape(labels)[0]
        if not cell.doubly_stochastic:
            return loss, loss, count
        penalty = doubly_stochastic_penalty(alpha, packing.index[:, 0], tf.shape(targets)[0])
        objective = loss + cell.doubly_stochastic * penalty / tf.cast(
            tf.maximum(count, 1), "float32"
        )
        return objective, loss, count


def image_state(model: keras.Model, features) -> tuple:
    """features (B, H, W, C) -> regions (B, L, C) (standardised with model.normalize_features),
    and the LSTM's initial h_0, c_0 (B, U) from their mean."""
    regions = model.get_layer("regions")(ops.convert_to_tensor(features, "float32"))
    if any(layer.name == "feature_norm" for layer in model.layers):
        regions = model.get_layer("feature_norm")(regions)
    mean = model.get_layer("mean_region")(regions)
    return regions, model.get_layer("init_h")(mean), model.get_layer("init_c")(mean)


def doubly_stochastic_penalty(alpha, captions, batch):
    """sum over captions and regions of (1 - sum_t alpha_ti)^2, t over each caption's real
    positions: alpha (N, L) at the N real positions, captions (N,) the batch row of each, batch
    B -> scalar."""
    import tensorflow as tf

    attended = tf.math.unsorted_segment_sum(alpha, captions, batch)  # (B, L)
    return ops.sum(ops.square(1.0 - attended))


def deep_output(model: keras.Model, embedded, hidden, context, training: bool = False):
    """tanh(E y_{t-1} + L_h dropout(h_t) + L_z z_t), then dropout: (..., E), in the output
    layer's compute dtype. The same layers as the functional graph, for any leading shape."""
    hidden = model.get_layer("hidden_dropout")(hidden, training=training)
    total = (
        embedded
        + model.get_layer("output_hidden")(hidden)
        + model.get_layer("output_context")(context)
    )
    deep = model.get_layer("deep_output")(total)
    return model.get_layer("output_dropout")(deep, training=training)


def build_model(
    feature_shape: tuple[int, int, int],
    vocab_size: int,
    cfg: ModelConfig,
    feature_mean: np.ndarray | None = None,
    feature_variance: np.ndarray | None = None,
    precision: str = "float32",
) -> keras.Model:
    """The training model: {"features": (B, H, W, C), "tokens": (B, T)} -> logits (B, T, V).

    feature_shape (H, W, C); feature_mean, feature_variance (C,) when cfg.normalize_features.
    precision "bfloat16" runs the deep output and the vocabulary layer in mixed bfloat16; the
    attention LSTM and the logits stay float32.
    """
    if cfg.cell != "lstm":
        raise CaptionerError(f"model.cell must be lstm for the attention decoder, got '{cfg.cell}'")
    dense_policy = policy(precision)
    height, width, channels = (int(size) for size in feature_shape)
    features = keras.Input((height, width, channels), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")

    regions = layers.Reshape((height * width, channels), name="regions")(features)  # (B, L, C)
    if cfg.normalize_features:
        if feature_mean is None or feature_variance is None:
            raise CaptionerError("model.normalize_features needs the training features' statistics")
        regions = layers.Normalization(
            mean=feature_mean, variance=feature_variance, name="feature_norm"
        )(regions)
    mean = layers.GlobalAveragePooling1D(name="mean_region")(regions)  # (B, C)
    h0 = layers.Dense(cfg.units, activation="tanh", name="init_h")(mean)
    c0 = layers.Dense(cfg.units, activation="tanh", name="init_c")(mean)

    embedded = layers.Embedding(vocab_size, cfg.embed_dim, name="embedding")(tokens)  # (B, T, E)
    hidden, context, _ = AttentionLSTM(
        cfg.units, cfg.attention_units, cfg.doubly_stochastic, name="attention_lstm"
    )(embedded, regions, h0, c0, tokens)

    hidden = layers.Dropout(cfg.dropout, name="hidden_dropout")(hidden)
    total = layers.Add(name="deep_sum")(
        [
            embedded,
            layers.Dense(cfg.embed_dim, name="output_hidden")(hidden),
            layers.Dense(cfg.embed_dim, use_bias=False, name="output_context")(context),
        ]
    )
    deep = layers.Activation("tanh", name="deep_output", dtype=dense_policy)(total)
    deep = layers.Dropout(cfg.dropout, name="output_dropout")(deep)
    logits = layers.Dense(vocab_size, name="logits", dtype=dense_policy)(deep)  # (B, T, V)
    if precision != "float32":  # softmax and loss in float32, as Keras mixed precision advises
        logits = layers.Activation("linear", name="logits_float32", dtype="float32")(logits)
    return AttentionModel({"features": features, "tokens": tokens}, logits, name="attention_model")


# --- the decoder interface: one step at a time with the trained layers ---------------------------
class AttentionDecoder(OutputDecoder):
    """The attention model as a decoder (models/decoder.py).

    State: ((regions (B, L, C), projected regions (B, L, A)), (h, c (R, U))): the image's parts
    never change between steps, the LSTM's do; R = B * K rows when beam search keeps K
    hypotheses per image (the image's parts are not repeated per beam: AttentionLSTM.step).
    `step` returns the attention alpha (R, L) of the step, over the regions in row-major order:
    the map of the word chosen from that step's logits.
    """

    name = "attention"

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_layer("embedding").output_dim)  # the deep output's width

    @property
    def regions(self) -> int:
        """L = H * W, the number of regions an attention map covers."""
        return int(self.model.get_layer("regions").output.shape[1])

    def start(self, features) -> tuple:
        """(B, H, W, C) features -> the state before <start>, as in inference (dropout off)."""
        regions, h, c = image_state(self.model, features)
        projected = self.model.get_layer("attention_lstm").project_regions(regions)
        return (regions, projected), (h, c)

    def step(self, token_ids, state) -> tuple:
        """token ids (B,) and state -> (hidden (B, E), new state, alpha (B, L)); eager or inside
        any tf.function."""
        return self._step(token_ids, state)

    def step_fn(self) -> Callable:
        """`step` for a compiled decoding loop (call it while tracing): the words' gate shares
        are looked up per token (token_table) instead of multiplied, the recurrent kernels are
        put side by side once, and XLA fuses the step's element-wise work."""
        import tensorflow as tf

        cell = self.model.get_layer("attention_lstm")
        table = cell.token_gates(self.model.get_layer("embedding").embeddings)  # (V, 4U)
        weights = attention_loop.Weights(*(tf.convert_to_tensor(w) for w in cell.step_weights()))
        compiled = tf.function(self._step, jit_compile=True)
        return lambda token_ids, state: compiled(token_ids, state, table, weights)

    def _step(self, token_ids, state, table=None, weights=None):
        (regions, projected), (h, c) = state
        model = self.model
        cell = model.get_layer("attention_lstm")
        embedded = model.get_layer("embedding")(token_ids)  # (B, E)
        gates_in = cell.token_gates(embedded) if table is None else ops.take(table, token_ids, 0)
        weights = cell.step_weights() if weights is None else weights
        h, c, context, alpha = cell.step(gates_in, h, c, regions, projected, weights)
        hidden = deep_output(model, embedded, h, context)  # (B, E)
        return hidden, ((regions, projected), (h, c)), alpha
