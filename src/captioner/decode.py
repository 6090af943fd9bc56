"""Greedy and beam-search decoding of feature arrays, batched over images and beams.

The loops are decode_loops.py's graph ops, on the decoder interface (models/decoder.py),
whichever caption model it is; here they are compiled with tf.function once per model and
settings (cached), fed slices of the features and cut at <end> into lists of word ids.

Attention maps: with `attention=True` each function returns (word ids, maps) instead of the word
ids alone. maps[i] is a float32 array (len(ids[i]), L) for a decoder with attention (L = H * W
regions in row-major order, each row summing to 1): row j is the attention of the step that
chose word j, so maps and words align one to one (the <end> token's map is not returned). Beam
search carries the maps of every surviving hypothesis along with its words. For a decoder
without attention (merge) maps is None.
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
# N lists of word ids, or with attention=True (ids, N maps (words, L) or None): module docstring
Decoded = list[list[int]] | tuple[list[list[int]], list[np.ndarray] | None]


def greedy(
    model: keras.Model,
    features: np.ndarray,
    max_length: int,
    batch_size: int = BATCH_SIZE,
    attention: bool = False,
) -> Decoded:
    """Most probable next word at every step. features (N, ...) -> N lists of word ids (and
    their attention maps with `attention`: see the module docstring)."""
    maps = attention and decoder_for(model).regions is not None
    shape = np.shape(features)[1:]
    run = _compiled(
        model,
        ("greedy", max_length, maps, shape),
        lambda: _greedy_loop(model, max_length, maps, shape),
    )
    return _decode_batches(run, features, batch_size, maps, attention)


def beam_search(
    model: keras.Model,
    features: np.ndarray,
    max_length: int,
    beam: int = 3,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    batch_size: int = BATCH_SIZE,
    attention: bool = False,
) -> Decoded:
    """Best of `beam` hypotheses per image. features (N, ...) -> N lists of word ids (and their
    attention maps with `attention`: see the module docstring)."""
    if beam < 1:
        raise ValueError(f"beam width must be at least 1, got {beam}")
    maps = attention and decoder_for(model).regions is not None
    shape = np.shape(features)[1:]
    key = ("beam", max_length, beam, float(length_penalty), no_repeat_ngram, maps, shape)
    run = _compiled(
        model,
        key,
        lambda: _beam_loop(model, max_length, beam, length_penalty, no_repeat_ngram, maps, shape),
    )
    return _decode_batches(run, features, max(1, batch_size // beam), maps, attention)


def decode(
    model: keras.Model,
    features: np.ndarray,
    max_length: int,
    beam: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    attention: bool = False,
) -> Decoded:
    """Greedy when beam == 1 and nothing is blocked, else beam search."""
    if beam == 1 and no_repeat_ngram == 0:
        return greedy(model, features, max_length, attention=attention)
    return beam_search(
        model, features, max_length, beam, length_penalty, no_repeat_ngram, attention=attention
    )


# --- shared pieces -----------------------------------------------------------------------------


def _compiled(model: keras.Model, key: tuple, build: Callable[[], Callable]) -> Callable:
    """One traced function per model and settings, reused across calls and batch sizes."""
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


def _decode_batches(
    run: Callable, features: np.ndarray, batch_size: int, with_maps: bool, attention: bool
) -> Decoded:
    """Run the compiled loop over slices of `features`; cut every row at its first <end>/pad,
    and its maps (when the loop makes them) to the same length.

    Slices are of (nearly) equal size: every new batch size costs a trace and an XLA compile.
    """
    results: list[list[int]] = []
    maps: list[np.ndarray] | None = [] if with_maps else None
    n_slices = max(1, -(-len(features) // batch_size))
    for rows in np.array_split(np.arange(len(features)), n_slices):
        if rows.size == 0:
            continue
        chunk = np.asarray(features[rows[0] : rows[-1] + 1], dtype=np.float32)  # (B, ...)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", MASK_WARNING)
            tokens, chunk_maps = run(tf.constant(chunk))  # (B, max_length), (B, max_length, L)
        words = [_until_end(row) for row in tokens.numpy()]
        results.extend(words)
        if maps is not None:
            maps.extend(m[: len(w)] for m, w in zip(chunk_maps.numpy(), words, strict=True))
    return (results, maps) if attention else results


def _until_end(row: np.ndarray) -> list[int]:
    words = []
    for token in row.tolist():
        if token in (END_ID, PAD_ID):
            break
        words.append(token)
    return words


def _greedy_loop(model: keras.Model, max_length: int, maps: bool, shape: tuple) -> Callable:
    """The compiled greedy loop: features (B, *shape) -> (ids (B, max_length), maps
    (B, max_length, L) of each step, or None unless `maps`)."""
    model_ref = weakref.ref(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32)], jit_compile=XLA)
    def run(features):
        decoder = decoder_for(model_ref())  # traced while the caller holds the model
        ids, _, attention = greedy_tokens(decoder, features, max_length, maps=maps)
        return ids, attention

    return run


def _beam_loop(
    model: keras.Model,
    max_length: int,
    beam: int,
    length_penalty: float,
    no_repeat_ngram: int,
    maps: bool,
    shape: tuple,
) -> Callable:
    """The compiled beam search: features (B, *shape) -> (ids (B, max_length), maps
    (B, max_length, L) of the best hypothesis, or None unless `maps`)."""
    model_ref = weakref.ref(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32)], jit_compile=XLA)
    def run(features):
        decoder = decoder_for(model_ref())  # traced while the caller holds the model
        ids, _, attention = beam_tokens(
            decoder, features, max_length, beam, length_penalty, no_repeat_ngram, maps=maps
        )
        return ids, attention

    return run
