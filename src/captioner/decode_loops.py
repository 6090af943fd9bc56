"""Greedy and beam search as graph ops on the decoder interface (models/decoder.py): plain
functions traced inside whatever tf.function calls them, with AutoGraph (which turns their
Python loops into while loops): decode.py's compiled and cached ones, or export_graph.py's
SavedModel and TFLite graphs (those pass compiled=False: no XLA, which TF Serving turns off by
default and TFLite does not have).

The state comes from the image features, then one step per token (no re-running of the prefix
per word) inside one loop per batch of images. Both stop at <end> or after `max_length` words,
whichever comes first, and stop early once every caption (or beam) has ended. Padding, <start>
and <unk> can never be emitted: the hidden vector is projected onto the columns of <end> and the
words only, so their logits are never even computed.

Beam search keeps `beam` hypotheses per image in one (images * beam) batch. A finished hypothesis
stays in its slot and may only be extended by padding at no cost, so finished and live hypotheses
compete for the slots and "every beam ended early" needs no special case. Hypotheses are ranked
by log-probability / length**length_penalty (0 = plain log-probability; length counts the words
and the <end> token). `no_repeat_ngram=n` forbids any word that would repeat an n-gram already
in the hypothesis. Log-probabilities are over the ids a caption may contain (likelihood.py's).

The decoder's state is (image, carry) (models/decoder.py): beam search repeats the carry per beam
and reorders it with the hypotheses; the image's parts (attention: the regions and their
projection) keep one row per image, shared by its beams. With `maps=True` the loops also return
the attention map of every chosen word, (B, max_length, L), for a decoder with attention (its
`regions` is L); beam search carries each surviving hypothesis's maps along with its words.
"""

from __future__ import annotations

import tensorflow as tf

from captioner.models import Decoder
from captioner.text import END_ID, PAD_ID, START_ID, UNK_ID

NEVER_EMIT = (PAD_ID, UNK_ID, START_ID)  # ids 0, 1, 2 (text.py): all below <end>, so
FIRST_ALLOWED = END_ID  # <end> (3) and the words (4...) are the ids a caption may contain
MASKED = -1e9  # finite, so masked scores never produce inf - inf = nan
BLOCK = 64  # columns per block in _top_k


def greedy_tokens(
    decoder: Decoder,
    features,
    max_length: int,
    compiled: bool = True,
    scores: bool = False,
    maps: bool = False,
):
    """Greedy decoding as graph ops (call while tracing). features (B, ...) float32 ->
    (ids (B, max_length) int32, <pad> after <end>; log-probabilities (B,) of the captions,
    <end> included, or None unless `scores`: the normaliser costs one more pass per step;
    attention maps (B, max_length, L) of each step, or None unless `maps`).

    compiled: the decoder's step_fn (XLA) instead of its plain step."""
    batch = tf.shape(features)[0]
    kernel, bias = _allowed_projection(decoder)  # (U, A), (A,)
    # the step only: the projection stays with oneDNN's matmul
    step = decoder.step_fn() if compiled else decoder.step
    image, carry = decoder.start(features)
    token = tf.fill([batch], START_ID)
    done = tf.zeros([batch], tf.bool)
    total = tf.zeros([batch])  # log-probability so far
    output = tf.zeros([max_length, batch], tf.int32)  # time-major so each step writes a row
    attention = tf.zeros([max_length, batch, decoder.regions if maps else 0])
    for t in tf.range(max_length):
        hidden, (_, carry), alpha = step(token, (image, carry))  # (B, U), ..., (B, L) | None
        logits = tf.matmul(tf.cast(hidden, tf.float32), kernel) + bias  # (B, A)
        if scores:
            best = tf.reduce_max(logits, axis=-1) - tf.reduce_logsumexp(logits, axis=-1)  # (B,)
            total += tf.where(done, 0.0, best)
        token = tf.argmax(logits, axis=-1, output_type=tf.int32) + FIRST_ALLOWED
        token = tf.where(done, PAD_ID, token)  # (B,)
        output = tf.tensor_scatter_nd_update(output, [[t]], token[None])
        if maps:
            attention = tf.tensor_scatter_nd_update(attention, [[t]], alpha[None])
        done = done | (token == END_ID)
        if tf.reduce_all(done):
            break
    return (
        tf.transpose(output),  # (B, max_length)
        total if scores else None,  # (B,)
        tf.transpose(attention, (1, 0, 2)) if maps else None,  # (B, max_length, L)
    )


def beam_tokens(
    decoder: Decoder,
    features,
    max_length: int,
    beam,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    compiled: bool = True,
    maps: bool = False,
    likelihood: bool = False,
):
    """Beam search as graph ops (call while tracing). features (B, ...) float32 -> (ids
    (B, max_length) int32 of each image's best hypothesis, <pad> after <end>; its log-probability
    (B,), <end> included, not divided by any length penalty; its attention maps
    (B, max_length, L), or None unless `maps`).

    beam: an int, or an int32 scalar tensor (>= 1) when the width is an input of the graph.
    compiled: the decoder's step_fn and an XLA-fused _scan instead of plain ops.
    likelihood: the log-probability under the model (likelihood.py's, what `captioner serve`
    reports) even when n-grams are blocked, at one more pass over the logits per step; without
    it, blocking makes it the one ranked by, over the words not blocked."""
    # Only a hypothesis's own best `per_row` words can enter the next beam: its rank is monotone
    # in the word's log-probability. So top-k per row first, then over (B, K * per_row).
    per_row = _minimum(beam, decoder.vocab_size - FIRST_ALLOWED)
    # A finished hypothesis has one continuation, padding at no cost: (per_row,)
    finished_logp = _first_free(per_row)
    batch = tf.shape(features)[0]
    rows = batch * beam  # hypotheses are rows b * beam + k
    kernel, bias = _allowed_projection(decoder)  # (U, A), (A,)
    step = decoder.step_fn() if compiled else decoder.step
    scan = _scan if compiled else _scan_ops
    # The carry (B*K, ...) is repeated per beam and reordered with the hypotheses; the image's
    # parts keep one row per image, shared by its beams (rows b*K ... b*K + K-1)
    image, carry = decoder.start(features)
    carry = tf.nest.map_structure(lambda part: tf.repeat(part, beam, axis=0), carry)
    token = tf.fill([rows], START_ID)
    # Only hypothesis 0 is alive at first, so the first step does not pick K copies of it.
    scores = tf.tile(_first_free(beam)[None], [batch, 1])  # (B, K)
    unblocked = likelihood and no_repeat_ngram > 0
    model_scores = scores  # (B, K) the same hypotheses' scores under the model, if `unblocked`
    lengths = tf.zeros([batch, beam])  # tokens scored, including <end>
    done = tf.zeros([batch, beam], tf.bool)
    sequences = tf.zeros([rows, max_length], tf.int32)
    attention = tf.zeros([rows, max_length, decoder.regions if maps else 0])
    # Rows are regrouped through reshapes by `batch`, a tensor: their number is unknown to the
    # loop even when the caller's batch is static.
    loop_variables = (scores, lengths, done, sequences, token, carry)
    loop_variables += ((model_scores,) if unblocked else ()) + ((attention,) if maps else ())
    any_rows = tf.nest.map_structure(lambda x: tf.TensorShape([None, *x.shape[1:]]), loop_variables)
    for t in tf.range(max_length):
        tf.autograph.experimental.set_loop_options(
            shape_invariants=list(zip(loop_variables, any_rows, strict=True))
        )
        hidden, (_, carry), alpha = step(token, (image, carry))  # (B*K, U), ..., (B*K, L)
        logits = tf.matmul(tf.cast(hidden, tf.float32), kernel) + bias  # (B*K, A)
        model_logits = logits  # before blocking
        if no_repeat_ngram > 0:
            logits += _repeated_ngram_mask(sequences, t, no_repeat_ngram, logits.shape[1])
        maxima, normaliser = scan(logits)  # (B*K, A / BLOCK), (B*K, 1)
        top_logits, top_ids = _top_k(logits, maxima, per_row)  # (B*K, P)
        top_logp = top_logits - normaliser  # log-probabilities over the allowed ids
        flat_done = tf.reshape(done, [rows, 1])
        top_logp = tf.where(flat_done, finished_logp, top_logp)
        top_ids = tf.where(flat_done, PAD_ID, top_ids + FIRST_ALLOWED)

        candidate = tf.expand_dims(scores, 2) + tf.reshape(top_logp, [batch, beam, per_row])
        candidate_length = tf.where(done, lengths, tf.cast(t + 1, tf.float32))  # (B, K)
        rank = candidate
        if length_penalty:
            rank = candidate / tf.expand_dims(candidate_length, 2) ** length_penalty
        _, best = tf.math.top_k(tf.reshape(rank, [batch, beam * per_row]), k=beam)  # (B, K)
        origin = best // per_row  # which hypothesis each new one extends
        new_token = tf.gather(tf.reshape(top_ids, [batch, -1]), best, batch_dims=1)  # (B, K)

        scores = tf.gather(tf.reshape(candidate, [batch, -1]), best, batch_dims=1)
        if unblocked:  # the chosen words were not blocked: their logits are the model's
            model_normaliser = tf.reduce_logsumexp(model_logits, axis=1, keepdims=True)
            model_logp = tf.where(flat_done, finished_logp, top_logits - model_normaliser)
            model_candidate = tf.expand_dims(model_scores, 2) + tf.reshape(
                model_logp, [batch, beam, per_row]
            )
            model_scores = tf.gather(tf.reshape(model_candidate, [batch, -1]), best, batch_dims=1)
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
    best_sequence = tf.reshape(sequences, [batch, beam, max_length])[:, 0]  # (B, max_length)
    best_maps = tf.reshape(attention, [batch, beam, max_length, -1])[:, 0] if maps else None
    return best_sequence, (model_scores if unblocked else scores)[:, 0], best_maps


def decode_tokens(
    decoder: Decoder,
    features,
    max_length: int,
    beam,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    compiled: bool = True,
):
    """decode()'s choice as graph ops: greedy when beam == 1 and nothing is blocked, else beam
    search; beam may be an int32 scalar tensor (then both loops are in the graph, under a
    tf.cond). -> (ids (B, max_length) int32, log-probabilities (B,) under the model)."""

    def greedy_branch():
        return greedy_tokens(decoder, features, max_length, compiled, scores=True)[:2]

    def beam_branch():
        return beam_tokens(
            decoder,
            features,
            max_length,
            beam,
            length_penalty,
            no_repeat_ngram,
            compiled,
            likelihood=True,
        )[:2]

    if no_repeat_ngram > 0:
        return beam_branch()
    if isinstance(beam, int):
        return greedy_branch() if beam == 1 else beam_branch()
    return tf.cond(tf.equal(beam, 1), greedy_branch, beam_branch)


def _minimum(a, b):
    """min(a, b) for ints, or as a tensor when either is one."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return tf.minimum(a, b)


def _first_free(width):
    """(width,) float32: 0 then MASKED: only the first slot is open (width an int or a tensor)."""
    return tf.where(tf.range(width) == 0, 0.0, MASKED)


def _reorder(carry, parent):
    """Every part of the carry (B*K, ...) taken from the hypotheses the new ones extend."""
    return tf.nest.map_structure(lambda part: tf.gather(part, parent), carry)


def _repeated_ngram_mask(sequences, t, n: int, width: int):
    """(B*K, A) MASKED (or a multiple) on the columns of words that would repeat an n-gram of
    the hypothesis, 0 elsewhere.

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
    match = tf.reduce_all(windows[:, :, :-1] == tf.expand_dims(last, 1), axis=-1)  # (R, S)
    following = windows[:, :, -1]  # (R, S) the id after each window
    # Finished hypotheses hold <pad> after <end>: no column to block (and they pad anyway).
    match &= tf.expand_dims(tf.range(starts) + n - 1 < t, 0) & (following >= FIRST_ALLOWED)
    # Scatter MASKED onto (row, column of the next word) for matches, 0 otherwise. scatter_nd
    # adds repeats up (a word blocked twice gets 2 * MASKED, as masked and still finite); it is
    # one of TFLite's own ops, a scatter-min is not.
    row_ids = tf.broadcast_to(tf.expand_dims(tf.range(rows), 1), tf.shape(match))
    column = tf.maximum(following - FIRST_ALLOWED, 0)
    indices = tf.reshape(tf.stack([row_ids, column], axis=-1), [-1, 2])
    updates = tf.reshape(tf.where(match, MASKED, 0.0), [-1])
    return tf.scatter_nd(indices, updates, [rows, width])


# --- shared pieces -----------------------------------------------------------------------------


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


def _scan_ops(logits):
    """The one pass over the (R, A) logits that beam search needs, fused by XLA.

    -> the maxima of the blocks of BLOCK columns (R, A / BLOCK), for _top_k, and the log
    normaliser log(sum(exp(logits))) (R, 1). At beam search's sizes the logits are larger than
    the CPU caches and every pass over them is a trip to memory: one pass instead of separate
    max, top-k and logsumexp ops.
    """
    maxima = tf.reduce_max(tf.reshape(logits, [tf.shape(logits)[0], -1, BLOCK]), axis=2)
    top = tf.reduce_max(maxima, axis=1, keepdims=True)  # (R, 1)
    return maxima, top + tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=1, keepdims=True))


_scan = tf.function(_scan_ops, jit_compile=True)


def _top_k(logits, maxima, k: int):
    """Exact top-k of each row of (R, A) logits, given their block maxima from _scan; much faster
    on CPU than tf.math.top_k over A columns (which costs as much as the projection itself).

    The k largest values lie in the k blocks with the largest maxima, so take the best k blocks
    and top-k over their R x k x BLOCK values (contiguous, so a few cache lines per row).
    """
    rows = tf.shape(logits)[0]
    k_blocks = _minimum(k, logits.shape[1] // BLOCK)
    _, best = tf.math.top_k(maxima, k=k_blocks)  # (R, kb)
    blocks = tf.reshape(logits, [rows, -1, BLOCK])
    candidates = tf.gather(blocks, best, batch_dims=1)  # (R, kb, BLOCK)
    values, position = tf.math.top_k(tf.reshape(candidates, [rows, k_blocks * BLOCK]), k=k)
    block = tf.gather(best, position // BLOCK, batch_dims=1)
    return values, block * BLOCK + position % BLOCK  # (R, k) values and columns
