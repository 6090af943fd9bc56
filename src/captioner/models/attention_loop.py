"""The attention LSTM's arithmetic: one step (for training and decoding alike), and the loop over
whole captions that training runs, with its backward pass written by hand.

Shapes: R rows (B images x K hypotheses each, K = 1 in training), L regions of C channels, A
attention units, U LSTM units. Weights, as `Weights` holds them: recurrent (U, 4U + A + 1) = the
LSTM's recurrent kernel, the attention's U_a and the gate's w_beta side by side (h_{t-1} is
multiplied once for all three); context (C, 4U), the context's share of the LSTM gates; score
(A, 1), the attention's w; gate_bias (1,). The LSTM's gates are in Keras' order (input, forget,
cell, output), the bias of the words' share (the caller's gates_in) included there.

Training runs on the packed layout of models/packed_lstm.py (only the real positions, N of
them, step t on the first n_t rows of the batch sorted longest first), with a hand-written
backward pass: autodiff of a tf.while_loop adds, at every step, the full-size gradient of every
tensor the loop reads into an accumulator (the projected regions (B, L, A), each weight). Here
the backward loop is packed_lstm.backward's LSTM recurrence, its gradient for h_{t-1} adding the
attention's and the gate's (`earlier`); the projected regions' gradient is summed row by row in
the loop, growing with the rows as the state's gradient does; each weight's gradient is one
matmul over all N positions after the loop; what needs no recurrence (the LSTM's gate
derivatives, h_{t-1}, c_{t-1}) is computed for all positions at once. docs/ATTENTION.md has the
costs; tests/test_attention.py checks the outputs and gradients against autodiff through the
step-by-step model.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops

from captioner.models import packed_lstm
from captioner.models.packed_lstm import Packing
from captioner.models.shared import lstm_gates


class Weights(NamedTuple):
    recurrent: object  # (U, 4U + A + 1)
    context: object  # (C, 4U)
    score: object  # (A, 1)
    gate_bias: object  # (1,)


def step(gates_in, h, c, regions, projected, weights: Weights) -> dict:
    """One step. gates_in (R, 4U) the word's share of the gates, h, c (R, U), regions (B, L, C),
    projected (B, L, A) = the regions' attention projection; rows b*K ... b*K + K - 1 are image
    b's, so an image's regions are read once for all its hypotheses.

    -> {"h", "c" (R, U), "context" z (R, C), "alpha" (R, L)} and what the backward pass needs:
    "act" (R, 4U) the gates after their activations, "tanh_c" (R, U), "energy" (B, K, L, A),
    "gate" beta (R, 1), "raw" (R, C) the context before the gate.
    """
    attention = projected.shape[-1]
    units = h.shape[-1]
    gates_h, toward, gate = ops.split(
        ops.matmul(h, weights.recurrent), [4 * units, 4 * units + attention], axis=1
    )  # (R, 4U), U_a h (R, A), (R, 1)
    gate = ops.sigmoid(gate + weights.gate_bias)  # beta
    images, regions_count = ops.shape(projected)[0], ops.shape(projected)[1]
    energy = ops.tanh(projected[:, None] + ops.reshape(toward, (images, -1, 1, attention)))
    scores = ops.matmul(ops.reshape(energy, (-1, attention)), weights.score)
    alpha = ops.softmax(ops.reshape(scores, (images, -1, regions_count)), axis=-1)  # (B, K, L)
    raw = ops.reshape(ops.matmul(alpha, regions), (-1, regions.shape[-1]))  # (R, C)
    context = gate * raw
    z = gates_in + gates_h + ops.matmul(context, weights.context)  # (R, 4U)
    i, f, g, o = lstm_gates(z)
    c = f * c + i * g
    tanh_c = ops.tanh(c)
    return {
        "h": o * tanh_c,
        "c": c,
        "context": context,
        "alpha": ops.reshape(alpha, (-1, regions_count)),
        "act": ops.concatenate([i, f, g, o], axis=1),
        "tanh_c": tanh_c,
        "energy": energy,
        "gate": gate,
        "raw": raw,
    }


SAVED = ("h", "c", "context", "alpha", "act", "gate", "raw", "energy")  # per step


def first_rows(packing: Packing):
    """The batch rows in step 0's order: the captions longest first (any of length 0 left out),
    the order `captions` wants the images' rows in."""
    import tensorflow as tf

    return packing.index[: tf.reduce_max(tf.concat([packing.sizes, [0]], 0)), 0]


def captions(gates_in, regions, projected, h0, c0, packing: Packing, weights: Weights) -> tuple:
    """The loop over whole captions, for training, on their real positions packed by `packing`
    (models/packed_lstm.py): step t runs on the first sizes[t] rows. gates_in (N, 4U) packed;
    regions (B, L, C), projected (B, L, A), h0, c0 (B, U) with their rows in step 0's order
    (first_rows).

    -> hs (N, U), zs (N, C), alphas (N, L), packed. Differentiable in everything but regions.
    """
    import tensorflow as tf

    regions = tf.stop_gradient(regions)  # image features: nothing upstream of them learns

    @tf.custom_gradient
    def run(gates_in, projected, h0, c0, recurrent, context, score, gate_bias):
        weights = Weights(recurrent, context, score, gate_bias)
        saved = _forward(gates_in, regions, projected, h0, c0, packing.sizes, weights)
        outputs = saved["h"], saved["context"], saved["alpha"]

        def gradient(*upstream):
            d_outputs = (
                tf.zeros_like(like) if d is None else d
                for d, like in zip(upstream, outputs, strict=True)
            )
            return _backward(*d_outputs, saved, regions, h0, c0, packing, weights)

        return outputs, gradient

    # tensors, not variables: what the loop reads comes in as arguments, and so do its gradients
    return run(gates_in, projected, h0, c0, *(tf.identity(weight) for weight in weights))


def _forward(gates_in, regions, projected, h0, c0, sizes, weights: Weights) -> dict:
    """The steps forwards -> {name in SAVED: packed (N, ...)}; "energy" (n_t, 1, L, A) per step
    stays a TensorArray, read back step by step (its concatenation would be a large copy)."""
    import tensorflow as tf

    units, attention = h0.shape[-1], projected.shape[-1]
    regions_count, channels = regions.shape[1], regions.shape[2]
    shapes = {
        "h": [units],
        "c": [units],
        "context": [channels],
        "alpha": [regions_count],
        "act": [4 * units],
        "gate": [1],
        "raw": [channels],
        "energy": [1, regions_count, attention],
    }
    steps = tf.shape(sizes)[0]

    def forward(t, start, h, c, arrays):
        size = sizes[t]  # the captions still going: the first `size` rows
        h, c = h[:size], c[:size]
        word = gates_in[start : start + size]
        out = step(word, h, c, regions[:size], projected[:size], weights)
        arrays = tuple(a.write(t, out[name]) for a, name in zip(arrays, SAVED, strict=True))
        return t + 1, start + size, out["h"], out["c"], arrays

    state = tf.TensorShape([None, units])
    *_, arrays = tf.while_loop(
        lambda t, *_: t < steps,
        forward,
        (
            tf.constant(0),
            tf.constant(0),
            h0,
            c0,
            tuple(packed_lstm.blocks(steps, tf.float32, shapes[name]) for name in SAVED),
        ),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), state, state, (None,) * 8),
    )
    saved = {
        name: packed_lstm.concat(array, shapes[name], tf.float32)
        for name, array in zip(SAVED, arrays, strict=True)
        if name != "energy"
    }
    return {**saved, "energy": arrays[-1]}


def _backward(d_hs, d_zs, d_alphas, saved, regions, h0, c0, packing, weights) -> tuple:
    """The gradients of `captions` for gates_in, projected, h0, c0 and the weights, from those of
    its packed outputs: the LSTM's recurrence backwards (packed_lstm.backward), whose gradient
    for h_{t-1} adds the attention's and the gate's; each weight's gradient one matmul over all
    positions after the loop."""
    import tensorflow as tf

    units, attention = weights.recurrent.shape[0], weights.score.shape[0]
    regions_count = regions.shape[1]
    energies, gates, alphas, raws = (saved[name] for name in ("energy", "gate", "alpha", "raw"))
    score = tf.reshape(weights.score, (-1,))  # (A,)
    # transposed once here, not inside the loop's matmuls (which are slower transposing)
    recurrent_t, context_t = (tf.transpose(w) for w in (weights.recurrent, weights.context))

    def earlier(t, d_z, take, size):
        """d h_{t-1} (n, U) through the gates z, the attention and the gate beta at step t."""
        energy = energies.read(t)  # (n, 1, L, A): one hypothesis per image in training
        gate, alpha = take(gates), take(alphas)
        d_context = tf.matmul(d_z, context_t) + take(d_zs)  # (n, C)
        d_gate = tf.reduce_sum(d_context * take(raws), 1, keepdims=True)  # (n, 1)
        d_alpha = take(d_alphas) + tf.linalg.matvec(regions[:size], d_context * gate)  # (n, L)
        d_scores = alpha * (d_alpha - tf.reduce_sum(alpha * d_alpha, 1, keepdims=True))
        # d_pre / w, the gradient of the energy's input but for the factor w (A,) on its last
        # axis, which is applied after the sums over regions and steps: one pass fewer
        d_pre = tf.raw_ops.TanhGrad(
            y=energy, dy=tf.broadcast_to(d_scores[:, None, :, None], tf.shape(energy))
        )  # (n, 1, L, A)
        d_both = tf.concat(
            [d_z, tf.reduce_sum(d_pre, [1, 2]) * score, tf.raw_ops.SigmoidGrad(y=gate, dy=d_gate)],
            1,
        )  # the gradient of h_{t-1} @ recurrent, (n, 4U + A + 1)
        d_score = tf.matmul(tf.reshape(d_scores, (1, -1)), tf.reshape(energy, (-1, attention)))
        return tf.matmul(d_both, recurrent_t), (d_both, d_score), (d_pre[:, 0],)

    gates_after = tf.split(saved["act"], 4, axis=1)  # i, f, g, o
    c_before = packed_lstm.before(saved["c"], packing.previous, c0)
    factors, d_c_from_h = packed_lstm.gate_factors(gates_after, c_before, saved["c"])
    d_z, d_h0, d_c0, (d_both, d_score), (d_projected,) = packed_lstm.backward(
        d_hs,
        factors,
        d_c_from_h,
        gates_after[1],
        packing.sizes,
        weights.recurrent,
        earlier,
        collect=([4 * units + attention + 1], [attention]),
        sums=([regions_count, attention],),
    )
    h_before = packed_lstm.before(saved["h"], packing.previous, h0)
    return (
        d_z,  # gates_in, packed like it
        d_projected * score,  # projected: the rows' sums over the steps, times w
        d_h0,
        d_c0,
        tf.matmul(h_before, d_both, transpose_a=True),  # recurrent
        tf.matmul(saved["context"], d_z, transpose_a=True),  # context
        tf.reshape(tf.reduce_sum(d_score, 0), (attention, 1)),  # score
        tf.reduce_sum(d_both[:, -1:], 0),  # gate_bias
    )
