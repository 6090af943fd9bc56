"""The merge model: image features + an RNN over the caption prefix, added, then dense layers.

Training graph (teacher forcing over whole captions):

    features (B, D) -> [feature_norm] -> image_dropout -> image_dense (relu)   -> (B, U)
    tokens   (B, T) -> embedding (mask_zero) -> text_dropout -> rnn (sequences) -> (B, T, U)
    merge: image broadcast over time + rnn output                              -> (B, T, U)
    -> decoder_dense (relu) -> logits (no softmax)                             -> (B, T, V)

Because the RNN is causal, logits[:, t] equals what the reference approach's one-prefix-per-sample
model outputs for the prefix tokens[:, :t+1] with the same weights (tests/test_model.py shows it).
The one-step functions at the bottom reuse the trained layers, so decoding steps the RNN state one
token at a time instead of re-running the whole prefix per word.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from captioner.config import ModelConfig
from captioner.errors import CaptionerError

RNN_LAYERS = {"lstm": layers.LSTM, "gru": layers.GRU}


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


def build_model(feature_dim: int, vocab_size: int, cfg: ModelConfig,
                feature_mean: np.ndarray | None = None,
                feature_variance: np.ndarray | None = None,
                precision: str = "float32") -> keras.Model:
    """The training model: {"features": (B, D), "tokens": (B, T)} -> logits (B, T, V).

    precision "bfloat16" computes in bfloat16 with float32 weights (Keras mixed precision);
    the logits are always float32.
    """
    if cfg.cell not in RNN_LAYERS:
        raise CaptionerError(f"model.cell must be one of {sorted(RNN_LAYERS)}, got '{cfg.cell}'")
    features = keras.Input((feature_dim,), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")

    x = features
    if cfg.normalize_features:
        if feature_mean is None or feature_variance is None:
            raise CaptionerError("model.normalize_features needs the training features' statistics")
        x = layers.Normalization(mean=feature_mean, variance=feature_variance, name="feature_norm")(x)
    x = layers.Dropout(cfg.dropout, name="image_dropout")(x)
    image = layers.Dense(cfg.units, activation="relu", name="image_dense")(x)  # (B, U)

    embedded = layers.Embedding(vocab_size, cfg.embed_dim, mask_zero=True, name="embedding")(tokens)
    embedded = layers.Dropout(cfg.dropout, name="text_dropout")(embedded)
    sequence = RNN_LAYERS[cfg.cell](cfg.units, return_sequences=True, name="rnn")(embedded)

    merged = MergeImageText(name="merge")(image, sequence)  # (B, T, U)
    hidden = layers.Dense(cfg.units, activation="relu", name="decoder_dense")(merged)
    logits = layers.Dense(vocab_size, name="logits", dtype="float32")(hidden)  # (B, T, V)
    return keras.Model({"features": features, "tokens": tokens}, logits, name="merge_model")


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam and cross-entropy on logits, ignoring padding targets (id 0)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    )


# --- one-step decoding with the trained layers ----------------------------------------------


def image_vector(model: keras.Model, features):
    """(B, D) features -> (B, U) image vector, as in inference (dropout off)."""
    x = features
    if any(layer.name == "feature_norm" for layer in model.layers):
        x = model.get_layer("feature_norm")(x)
    return model.get_layer("image_dense")(x)


def initial_state(model: keras.Model, batch_size):
    """Zero RNN state: [h, c] for an LSTM, [h] for a GRU, each (B, U)."""
    rnn = model.get_layer("rnn")
    zeros = ops.zeros((batch_size, rnn.units))
    return [zeros, zeros] if isinstance(rnn, layers.LSTM) else [zeros]


def step(model: keras.Model, image, token_ids, state):
    """One decoding step: token ids (B,) and RNN state -> logits (B, V) and the new state."""
    embedded = model.get_layer("embedding")(token_ids)  # (B, E)
    rnn_cell = model.get_layer("rnn").cell
    output, new_state = rnn_cell(embedded, state if len(state) > 1 else state[0])
    if not isinstance(new_state, (list, tuple)):
        new_state = [new_state]
    hidden = model.get_layer("decoder_dense")(image + output)  # (B, U)
    return model.get_layer("logits")(hidden), list(new_state)  # (B, V)
