"""Greedy and beam-search decoding, batched over images and beams, compiled with tf.function.

Both run on the decoder interface (models/decoder.py), whichever caption model it is: the state
from the image features, then one step per token (no re-running of the prefix per word) inside
one compiled loop per batch of images. They stop at <end> or after `max_length` words,
whichever comes first, and stop early once every caption (or beam) has ended. Padding, <start>
and <unk> can never be emitted: the hidden vector is projected onto the columns of <end> and the
words only, so their logits are never even computed.

Beam search keeps `beam` hypotheses per image in one (images * beam) batch. A finished hypothesis
stays in its slot and may only be extended by padding at no cost, so finished and live hypotheses
compete for the slots and "every beam ended early" needs no special case. Hypotheses are ranked
by log-probability / length**length_penalty (0 = plain log-probability; length counts the words
and the <end> token). `no_repeat_ngram=n` forbids any word that would repeat an n-gram already
in the hypothesis.

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

from captioner.models import Decoder, decoder_for
from captioner.text import END_ID, PAD_ID, START_ID, UNK_ID

NEVER_EMIT = (PAD_ID, UNK_ID, START_ID)  # ids 0, 1, 2 (text.py): all below <end>, so
FIRST_ALLOWED = END_ID  # <end> (3) and the words (4...) are the ids a caption may contain
MASKED = -1e9  # finite, so masked scores never produce inf - inf = nan
XLA = False  # jit_compile for the whole loop: slower on CPU here (BENCHMARKS.md)
BLOCK = 64  # columns per block in _top_k
BATCH_SIZE = 3000  # hypotheses (images * beam) per compiled call; bounds memory at (rows, vocab)

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
    run = _compiled(
        model,
        ("greedy", max_length, maps, np.shape(features)[1:]),
        lambda: _greedy_loop(model, max_length, maps, np.shape(features)[1:]),
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
            # Tracing feeds one embedded token (mask_zero) to the LSTM cell, which warns that it
            # drops the mask; a single token has nothing to mask.
            warnings.filterwarnings("ignore", "Layer 'lstm_cell'.*does not support masking")
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


def _allowed_projection(decoder: Decoder) -> tuple[tf.Tensor, tf.Tensor]:
    """The output layer restricted to the ids a caption may contain, <end> and the words.

    -> kernel (U, A), bias (A,) with A = V - 3 rounded up to a multiple of BLOCK; the padding
    columns have bias 2 * MASKED, below any real column even when n-gram blocking masked it, so
    they are never chosen. Column a is id a + FIRST_ALLOWED. Projecting onto these columns masks
    <pad>, <unk> and <start> for free and lets _scan reshape the logits into blocks.
    """
    kernel, bias = decoder.output_layer()  # (U, V), (V,)
    kernel = tf.convert_to_tensor(kernel)[:, FIRST_ALLOWED:]
    bias = tf.convert_to_tensor(bias)[FIRST_ALLOWED:]
    padding = -kernel.shape[1] % BLOCK
    return (
        tf.pad(kernel, [[0, 0], [0, padding]]),
        tf.pad(bias, [[0, padding]], constant_values=2 * MASKED),
    )


@tf.function(jit_compile=True)
def _scan(logits):
    """The one pass over the (R, A) logits that beam search needs, fused by XLA.

    -> the maxima of the blocks of BLOCK columns (R, A / BLOCK), for _top_k, and the log
    normaliser log(sum(exp(logits))) (R, 1). At beam search's sizes the logits are larger than
    the CPU caches and every pass over them is a trip to memory: one pass instead of separate
    max, top-k and logsumexp ops.
    """
    maxima = tf.reduce_max(tf.reshape(logits, [tf.shape(logits)[0], -1, BLOCK]), axis=2)
    top = tf.reduce_max(maxima, axis=1, keepdims=True)  # (R, 1)
    return maxima, top + tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=1, keepdims=True))


def _top_k(logits, maxima, k: int):
    """Exact top-k of each row of (R, A) logits, given their block maxima from _scan; much faster
    on CPU than tf.math.top_k over A columns (which costs as much as the projection itself).

    The k largest values lie in the k blocks with the largest maxima, so take the best k blocks
    and top-k over their R x k x BLOCK values (contiguous, so a few cache lines per row).
    """
    rows = tf.shape(logits)[0]
    k_blocks = min(k, logits.shape[1] // BLOCK)
    _, best = tf.math.top_k(maxima, k=k_blocks)  # (R, kb)
    blocks = tf.reshape(logits, [rows, -1, BLOCK])
    candidates = tf.gather(blocks, best, batch_dims=1)  # (R, kb, BLOCK)
    values, position = tf.math.top_k(tf.reshape(candidates, [rows, k_blocks * BLOCK]), k=k)
    block = tf.gather(best, position // BLOCK, batch_dims=1)
    return values, block * BLOCK + position % BLOCK  # (R, k) values and columns


# --- greedy ------------------------------------------------------------------------------------


def _greedy_loop(model: keras.Model, max_length: int, maps: bool, shape: tuple) -> Callable:
    """The compiled greedy loop: features (B, *shape) -> (ids (B, max_length), maps
    (B, max_length, L) of each step, or None unless `maps`)."""
    model_ref = weakref.ref(model)
    regions = decoder_for(model).regions or 0

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32)], jit_compile=XLA)
    def run(features):
        decoder = decoder_for(model_ref())  # traced while the caller holds the model
        batch = tf.shape(features)[0]
        kernel, bias = _allowed_projection(decoder)  # (U, A), (A,)
        step = decoder.step_fn()  # the step only: the projection stays with oneDNN's matmul
        state = decoder.start(features)
        token = tf.fill([batch], START_ID)
        done = tf.zeros([batch], tf.bool)
        output = tf.zeros([max_length, batch], tf.int32)  # time-major so each step writes a row
        attention = tf.zeros([max_length, batch, regions if maps else 0])
        for t in tf.range(max_length):
            hidden, state, alpha = step(token, state)  # (B, U), state, (B, L) | None
            logits = tf.matmul(tf.cast(hidden, tf.float32), kernel) + bias  # (B, A)
            token = tf.argmax(logits, axis=-1, output_type=tf.int32) + FIRST_ALLOWED
            token = tf.where(done, PAD_ID, token)  # (B,)
            output = tf.tensor_scatter_nd_update(output, [[t]], token[None])
            if maps:
                attention = tf.tensor_scatter_nd_update(attention, [[t]], alpha[None])
            done = done | (token == END_ID)
            if tf.reduce_all(done):
                break
        return tf.transpose(output), (tf.transpose(attention, (1, 0, 2)) if maps else None)

    return run


# --- beam search -------------------------------------------------------------------------------


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
    # Only a hypothesis's own best `per_row` words can enter the next beam: its rank is monotone
    # in the word's log-probability. So top-k per row first, then over (B, K * per_row).
    per_row = min(beam, decoder_for(model).vocab_size - FIRST_ALLOWED)
    regions = decoder_for(model).regions or 0
    # A finished hypothesis has one continuation, padding at no cost: (per_row,)
    finished_logp = tf.constant([0.0] + [MASKED] * (per_row - 1))
    model_ref = weakref.ref(model)

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32)], jit_compile=XLA)
    def run(features):
        decoder = decoder_for(model_ref())  # traced while the caller holds the model
        batch = tf.shape(features)[0]
        rows = batch * beam  # hypotheses are rows b * beam + k
        kernel, bias = _allowed_projection(decoder)  # (U, A), (A,)
        step = decoder.step_fn()
        # The carry (B*K, ...) is repeated per beam and reordered with the hypotheses; the
        # image's parts keep one row per image, shared by its beams (rows b*K ... b*K + K-1)
        image, carry = decoder.start(features)
        carry = tf.nest.map_structure(lambda part: tf.repeat(part, beam, axis=0), carry)
        token = tf.fill([rows], START_ID)
        # Only hypothesis 0 is alive at first, so the first step does not pick K copies of it.
        scores = tf.tile(tf.constant([[0.0] + [MASKED] * (beam - 1)]), [batch, 1])  # (B, K)
        lengths = tf.zeros([batch, beam])  # tokens scored, including <end>
        done = tf.zeros([batch, beam], tf.bool)
        sequences = tf.zeros([rows, max_length], tf.int32)
        attention = tf.zeros([rows, max_length, regions if maps else 0])
        for t in tf.range(max_length):
            hidden, (image, carry), alpha = step(token, (image, carry))  # (B*K, U), ..., (B*K, L)
            logits = tf.matmul(tf.cast(hidden, tf.float32), kernel) + bias  # (B*K, A)
            if no_repeat_ngram > 0:
                logits += _repeated_ngram_mask(sequences, t, no_repeat_ngram, logits.shape[1])
            maxima, normaliser = _scan(logits)  # (B*K, A / BLOCK), (B*K, 1)
            top_logits, top_ids = _top_k(logits, maxima, per_row)  # (B*K, P)
            top_logp = top_logits - normaliser  # log-probabilities over the allowed ids
            flat_done = tf.reshape(done, [rows, 1])
            top_logp = tf.where(flat_done, finished_logp, top_logp)
            top_ids = tf.where(flat_done, PAD_ID, top_ids + FIRST_ALLOWED)

            candidate = scores[:, :, None] + tf.reshape(top_logp, [batch, beam, per_row])
            candidate_length = tf.where(done, lengths, tf.cast(t + 1, tf.float32))  # (B, K)
            rank = candidate
            if length_penalty:
                rank = candidate / candidate_length[:, :, None] ** length_penalty
            _, best = tf.math.top_k(tf.reshape(rank, [batch, beam * per_row]), k=beam)  # (B, K)
            origin = best // per_row  # which hypothesis each new one extends
            new_token = tf.gather(tf.reshape(top_ids, [batch, -1]), best, batch_dims=1)  # (B, K)

            scores = tf.gather(tf.reshape(candidate, [batch, -1]), best, batch_dims=1)
            lengths = tf.gather(candidate_length, origin, batch_dims=1)
            done = tf.gather(done, origin, batch_dims=1) | (new_token == END_ID)
            parent = tf.reshape(origin + tf.range(batch)[:, None] * beam, [rows])  # (B*K,)
            carry = _reorder(carry, parent)
            token = tf.reshape(new_token, [rows])
            at_t = tf.stack([tf.range(rows), tf.fill([rows], t)], axis=1)  # (B*K, 2)
            sequences = tf.tensor_scatter_nd_update(tf.gather(sequences, parent), at_t, token)
            if maps:  # the new word's map is its parent's attention at this step
                attention = tf.tensor_scatter_nd_update(
                    tf.gather(attention, parent), at_t, tf.gather(alpha, parent)
                )
            if tf.reduce_all(done):
                break
        # top_k sorted every image's hypotheses by rank, so hypothesis 0 is the best one.
        best_maps = tf.reshape(attention, [batch, beam, max_length, -1])[:, 0] if maps else None
        return tf.reshape(sequences, [batch, beam, max_length])[:, 0], best_maps

    return run


def _reorder(carry, parent):
    """Every part of the carry (B*K, ...) taken from the hypotheses the new ones extend."""
    return tf.nest.map_structure(lambda part: tf.gather(part, parent), carry)


def _repeated_ngram_mask(sequences, t, n: int, width: int):
    """(B*K, A) MASKED on the columns of words that would repeat an n-gram of the hypothesis.

    sequences (B*K, T) holds the t ids chosen so far. A word w is blocked when the last n-1
    words followed by w occur earlier: for every start j with j + n - 1 < t, compare
    sequences[:, j:j+n-1] with the last n-1 words and, on a match, block sequences[:, j+n-1].
    """
    rows, length = tf.shape(sequences)[0], sequences.shape[1]
    starts = length - n + 1
    if starts <= 0:
        return tf.zeros([rows, width])
    windows = tf.stack([sequences[:, i : i + starts] for i in range(n)], axis=-1)  # (R, S, n)
    last = tf.gather(sequences, tf.maximum(t - n + 1, 0) + tf.range(n - 1), axis=1)  # (R, n-1)
    match = tf.reduce_all(windows[:, :, :-1] == last[:, None, :], axis=-1)  # (R, S)
    following = windows[:, :, -1]  # (R, S) the id after each window
    # Finished hypotheses hold <pad> after <end>: no column to block (and they pad anyway).
    match &= (tf.range(starts) + n - 1 < t)[None, :] & (following >= FIRST_ALLOWED)
    # Scatter-min MASKED onto (row, column of the next word) for matches, 0 otherwise.
    row_ids = tf.broadcast_to(tf.range(rows)[:, None], tf.shape(match))
    column = tf.maximum(following - FIRST_ALLOWED, 0)
    indices = tf.reshape(tf.stack([row_ids, column], axis=-1), [-1, 2])
    updates = tf.reshape(tf.where(match, MASKED, 0.0), [-1])
    return tf.tensor_scatter_nd_min(tf.zeros([rows, width]), indices, updates)
