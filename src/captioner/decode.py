"""Greedy and beam-search decoding of feature arrays, batched over images and beams.

The loops are decode_loops.py's graph ops, on the decoder interface (models/decoder.py),
whichever caption model it is; here they are compiled with tf.function once per model and
settings (cached), fed slices of the features and cut at <end> into lists of word ids.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from captioner.decode_loops import beam_tokens, greedy_tokens
from captioner.models import decoder_for
from captioner.text import END_ID, PAD_ID

XLA = False  # jit_compile for the whole loop: slower on CPU here (BENCHMARKS.md)
BATCH_SIZE = 3000  # hypotheses (images * beam) per compiled call; bounds memory at (rows, vocab)
# Tracing feeds one embedded token (mask_zero) to the LSTM cell, which warns that it drops the
# mask; a single token has nothing to mask. Filtered wherever a decoding loop is traced.
MASK_WARNING = "Layer 'lstm_cell'.*does not support masking"

# Compiled decoders per model and settings. Weak keys, and the decoders hold their model only
# weakly (they need it while tracing), so a model its caller drops is freed with its graphs.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def greedy(
    model: keras.Model, features: np.ndarray, max_length: int, batch_size: int = BATCH_SIZE
) -> list[list[int]]:
    """Most probable next word at every step. features (N, D) -> N lists of word ids."""
    run = _compiled(model, ("greedy", max_length), lambda: _greedy_loop(model, max_length))
    return _decode_batches(run, features, batch_size)


def beam_search(
    model: keras.Model,
    features: np.ndarray,
    max_length: int,
    beam: int = 3,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    batch_size: int = BATCH_SIZE,
) -> list[list[int]]:
    """Best of `beam` hypotheses per image. features (N, D) -> N lists of word ids."""
    if beam < 1:
        raise ValueError(f"beam width must be at least 1, got {beam}")
    key = ("beam", max_length, beam, float(length_penalty), no_repeat_ngram)
    run = _compiled(
        model, key, lambda: _beam_loop(model, max_length, beam, length_penalty, no_repeat_ngram)
    )
    return _decode_batches(run, features, max(1, batch_size // beam))


def decode(
    model: keras.Model,
    features: np.ndarray,
    max_length: int,
    beam: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
) -> list[list[int]]:
    """Greedy when beam == 1 and nothing is blocked, else beam search."""
    if beam == 1 and no_repeat_ngram == 0:
        return greedy(model, features, max_length)
    return beam_search(model, features, max_length, beam, length_penalty, no_repeat_ngram)


# --- shared pieces -----------------------------------------------------------------------------


def _compiled(model: keras.Model, key: tuple, build: Callable[[], Callable]) -> Callable:
    """One traced function per model and settings, reused across calls and batch sizes."""
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


def _decode_batches(run: Callable, features: np.ndarray, batch_size: int) -> list[list[int]]:
    """Run the compiled loop over slices of `features`; cut every row at its first <end>/pad.

    Slices are of (nearly) equal size: every new batch size costs a trace and an XLA compile.
    """
    results: list[list[int]] = []
    if len(features) == 0:
        return results
    n_slices = -(-len(features) // batch_size)
    for rows in np.array_split(np.arange(len(features)), n_slices):
        chunk = np.asarray(features[rows[0] : rows[-1] + 1], dtype=np.float32)  # (B, D)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", MASK_WARNING)
            tokens = run(tf.constant(chunk)).numpy()  # (B, max_length)
        results.extend(_until_end(row) for row in tokens)
    return results


def _until_end(row: np.ndarray) -> list[int]:
    words = []
    for token in row.tolist():
        if token in (END_ID, PAD_ID):
            break
        words.append(token)
    return words


def _greedy_loop(model: keras.Model, max_length: int) -> Callable:
    model_ref = weakref.ref(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)], jit_compile=XLA)
    def run(features):
        # traced while the caller holds the model
        return greedy_tokens(decoder_for(model_ref()), features, max_length)[0]

    return run


def _beam_loop(
    model: keras.Model, max_length: int, beam: int, length_penalty: float, no_repeat_ngram: int
) -> Callable:
    model_ref = weakref.ref(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)], jit_compile=XLA)
    def run(features):
        decoder = decoder_for(model_ref())  # traced while the caller holds the model
        return beam_tokens(decoder, features, max_length, beam, length_penalty, no_repeat_ngram)[0]

    return run
