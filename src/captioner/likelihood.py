"""How probable a caption is under its model: the log-probability `captioner serve` reports next
to each caption.

log P(caption | image) = the sum, over the caption's words and its <end>, of each token's
log-probability given the image and the words before it. The distribution is the one decoding
draws from (decode.py): a softmax over <end> and the words only, since <pad>, <unk> and <start>
can never be emitted. So for a beam-search caption without n-gram blocking this is the score
beam search ranked it by before any length penalty. A caption cut at `max_length` words never
emitted <end>, and its sum stops at its last word.

One call of the training graph scores a whole batch (teacher forcing: the decoder interface's
`build` model takes {"features", "tokens"} and returns logits at every position), so any decoder
the house has is scored the same way.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from captioner.text import END_ID, PAD_ID, START_ID

FIRST_ALLOWED = END_ID  # ids below <end> (<pad>, <unk>, <start>) are never emitted (decode.py)

# One compiled scorer per model; weak keys, so a model its caller drops is freed with its graph.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def log_probabilities(
    model: keras.Model, features: np.ndarray, captions: Sequence[Sequence[int]], max_length: int
) -> np.ndarray:
    """features (N, ...) and N captions as word ids (decode.decode's output) -> (N,) float32
    log-probabilities, each <= 0."""
    if len(captions) == 0:
        return np.zeros(0, np.float32)
    # tokens = [<start>, w1..wn] is the input, targets = [w1..wn, <end>] what it must predict.
    targets = [list(words) + ([END_ID] if len(words) < max_length else []) for words in captions]
    width = max(len(row) for row in targets)
    tokens = np.full((len(targets), width), PAD_ID, np.int32)  # (N, T)
    padded = np.full((len(targets), width), PAD_ID, np.int32)  # (N, T)
    for row, words in enumerate(targets):
        tokens[row, 0] = START_ID
        tokens[row, 1 : len(words)] = words[:-1]
        padded[row, : len(words)] = words
    scorer = _COMPILED.get(model)
    if scorer is None:
        scorer = _COMPILED[model] = _scorer(model)
    features = tf.constant(np.asarray(features, np.float32))
    return scorer(features, tf.constant(tokens), tf.constant(padded)).numpy()


def feature_shape(model: keras.Model) -> tuple[int, ...]:
    """The shape of one image's features the model takes: (D,) for the merge model."""
    (features,) = [tensor for tensor in model.inputs if tensor.name == "features"]
    return tuple(int(size) for size in features.shape[1:])


def _scorer(model: keras.Model):
    model_ref = weakref.ref(model)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *feature_shape(model)], tf.float32),
            tf.TensorSpec([None, None], tf.int32),  # tokens (N, T)
            tf.TensorSpec([None, None], tf.int32),  # targets (N, T)
        ]
    )
    def score(features, tokens, targets):
        logits = model_ref()({"features": features, "tokens": tokens}, training=False)  # (N, T, V)
        allowed = tf.nn.log_softmax(tf.cast(logits[:, :, FIRST_ALLOWED:], tf.float32))
        column = tf.maximum(targets - FIRST_ALLOWED, 0)  # padding reads column 0, masked below
        picked = tf.gather(allowed, column, batch_dims=2)  # (N, T)
        return tf.reduce_sum(tf.where(targets != PAD_ID, picked, 0.0), axis=1)  # (N,)

    return score
