"""The attention LSTM's arithmetic: one step (for training and decoding alike), and the loop over
whole captions that training runs, with its backward pass written by hand.

Shapes: R rows (B images x K hypotheses each, K = 1 in training), L regions of C channels, A
attention units, U LSTM units. Weights, as `Weights` holds them: recurrent (U, 4U + A + 1) = the
LSTM's recurrent kernel, the attention's U_a and the gate's w_beta side by side (h_{t-1} is
multiplied once for all three); context (C, 4U), the context's share of the LSTM gates; score
(A, 1), the attention's w; gate_bias (1,). The LSTM's gates are in Keras' order (input, forget,
cell, output), the bias of the words' share (the caller's gates_in) included there.

Why a hand-written backward pass: autodiff of a tf.while_loop adds, at every step, the full-size
gradient of every tensor the loop reads into an accumulator: the projected regions (B, L, A) and
each weight, whether or not the step used all of it. Here the backward loop touches only the n_t
rows still in their caption, the gradient of the projected regions is one segment sum after the
loop, and each weight's gradient one matmul over all steps' rows. 1.15x (7x7) to 1.4x (14x14)
faster than autodiff on real caption lengths (docs/ATTENTION.md); tests/test_attention.py checks
that the gradients equal autodiff's through the step-by-step model.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops


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
    z_input, z_forget, z_cell, z_output = ops.split(z, 4, axis=1)
    act = ops.concatenate(
        [ops.sigmoid(z_input), ops.sigmoid(z_forget), ops.tanh(z_cell), ops.sigmoid(z_output)], 1
    )
    i, f, g, o = ops.split(act, 4, axis=1)
    c = f * c + i * g
    tanh_c = ops.tanh(c)
    return {
        "h": o * tanh_c,
        "c": c,
        "context": context,
        "alpha": ops.reshape(alpha, (-1, regions_count)),
        "act": act,
        "tanh_c": tanh_c,
        "energy": energy,
        "gate": gate,
        "raw": raw,
    }


SAVED = ("h_prev", "c_prev", "act", "tanh_c", "energy", "alpha", "gate", "raw")  # per step


class Packing(NamedTuple):
    """Where the real positions of a post-padded (B, T) batch go when packed: step by step, the
    rows still in their caption at that step, longest caption first (PyTorch's PackedSequence).

    order (B,): the batch's rows, longest caption first. sizes (T,): how many are still going at
    each step. index (N, 2): (row, step) of each packed position, so tf.gather_nd(padded, index)
    packs any (B, T, ...) tensor and tf.scatter_nd(index, packed, (B, T, ...)) unpacks it.
    """

    order: object
    sizes: object
    index: object


def pack(lengths) -> Packing:
    """The packing of a batch whose rows have these lengths (B,) (real positions first)."""
    import tensorflow as tf

    lengths = tf.cast(lengths, tf.int32)
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    steps = tf.range(tf.reduce_max(tf.concat([lengths, [0]], 0)))[:, None]  # (T, 1)
    real = steps < tf.gather(lengths, order)[None, :]  # (T, B), longest first
    rows = tf.boolean_mask(tf.broadcast_to(order[None, :], tf.shape(real)), real)
    at = tf.boolean_mask(tf.broadcast_to(steps, tf.shape(real)), real)
    return Packing(order, tf.reduce_sum(tf.cast(real, tf.int32), 1), tf.stack([rows, at], 1))


def captions(gates_in, regions, projected, h0, c0, sizes, weights: Weights) -> tuple:
    """The loop over whole captions, for training, on packed positions (Packing): gates_in
    (N, 4U); regions (B, L, C), projected (B, L, A), h0, c0 (B, U), their rows longest caption
    first; sizes (T,) the rows still going at each step: step t runs on the first sizes[t] rows.

    -> hs (N, U), zs (N, C), alphas (N, L), packed. Differentiable in everything but regions.
    """
    import tensorflow as tf

    regions = tf.stop_gradient(regions)  # image features: nothing upstream of them learns
    units, attention = h0.shape[-1], projected.shape[-1]
    regions_count, channels = regions.shape[1], regions.shape[2]
    widths = {
        "h_prev": [units],
        "c_prev": [units],
        "act": [4 * units],
        "tanh_c": [units],
        "energy": [1, regions_count, attention],
        "alpha": [regions_count],
        "gate": [1],
        "raw": [channels],
    }
    steps = tf.shape(sizes)[0]
    offsets = tf.cumsum(sizes, exclusive=True)  # where each step's rows start

    def blocks(*shape):  # one element per step, of sizes[t] rows
        element = tf.TensorShape([None, *shape])
        return tf.TensorArray(tf.float32, size=steps, infer_shape=False, element_shape=element)

    def packed(array, *shape):  # the steps' blocks one after the other: (N, ...)
        return tf.ensure_shape(
            tf.cond(array.size() > 0, array.concat, lambda: tf.zeros([0, *shape])), [None, *shape]
        )

    @tf.custom_gradient
    def run(gates_in, projected, h0, c0, recurrent, context, score, gate_bias):
        weights = Weights(recurrent, context, score, gate_bias)

        def forward(t, h, c, outputs, saved):
            start, n = offsets[t], sizes[t]
            h, c = h[:n], c[:n]
            out = step(gates_in[start : start + n], h, c, regions[:n], projected[:n], weights)
            values = {**out, "h_prev": h, "c_prev": c}
            saved = tuple(a.write(t, values[name]) for a, name in zip(saved, SAVED, strict=True))
            names = ("h", "context", "alpha")
            outputs = tuple(a.write(t, out[name]) for a, name in zip(outputs, names, strict=True))
            return t + 1, out["h"], out["c"], outputs, saved

        state = tf.TensorShape([None, units])
        *_, outputs, saved = tf.while_loop(
            lambda t, *_: t < steps,
            forward,
            (
                tf.constant(0),
                h0,
                c0,
                (blocks(units), blocks(channels), blocks(regions_count)),
                tuple(blocks(*widths[name]) for name in SAVED),
            ),
            shape_invariants=(tf.TensorShape([]), state, state, (None,) * 3, (None,) * 8),
        )
        hs, zs, alphas = (
            packed(a, n) for a, n in zip(outputs, (units, channels, regions_count), strict=True)
        )

        def gradient(*upstream):
            d_hs, d_zs, d_alphas = (
                tf.zeros_like(like) if d is None else d
                for d, like in zip(upstream, (hs, zs, alphas), strict=True)
            )
            return _backward(
                (d_hs, d_zs, d_alphas), saved, zs, sizes, offsets, regions, weights, blocks, packed
            )

        return (hs, zs, alphas), gradient

    # tensors, not variables: what the loop reads comes in as arguments, and so do its gradients
    return run(gates_in, projected, h0, c0, *(tf.identity(weight) for weight in weights))


def _backward(upstream, saved, zs, sizes, offsets, regions, weights, blocks, packed) -> tuple:
    """The gradients of `captions` for gates_in, projected, h0, c0 and the weights, from those of
    its packed outputs; from the last step to the first."""
    import tensorflow as tf

    d_hs, d_zs, d_alphas = upstream
    steps, batch = tf.shape(sizes)[0], tf.shape(regions)[0]
    units, attention = weights.recurrent.shape[0], weights.score.shape[0]
    regions_count = regions.shape[1]
    score_row = tf.reshape(weights.score, (1, 1, -1))

    def back(t, dh, dc, d_score, collected):
        start, n = offsets[t], sizes[t]
        h_prev, c_prev, act, tanh_c, energy, alpha, gate, raw = (a.read(t) for a in saved)
        energy = energy[:, 0]  # (n, L, A): one hypothesis per image in training
        grow = [[0, n - tf.shape(dh)[0]], [0, 0]]  # captions ending at t: nothing from t + 1
        dh = tf.pad(dh, grow) + d_hs[start : start + n]
        i, f, g, o = tf.split(act, 4, 1)
        dc = tf.pad(dc, grow) + tf.raw_ops.TanhGrad(y=tanh_c, dy=dh * o)
        d_act = tf.concat([dc * g, dc * c_prev, dc * i, dh * tanh_c], 1)
        sigmoid_grad = tf.raw_ops.SigmoidGrad(y=act, dy=d_act)  # right for i, f, o
        dz = tf.concat(
            [
                sigmoid_grad[:, : 2 * units],
                tf.raw_ops.TanhGrad(y=g, dy=dc * i),
                sigmoid_grad[:, 3 * units :],
            ],
            1,
        )  # (n, 4U)
        d_context = tf.matmul(dz, weights.context, transpose_b=True) + d_zs[start : start + n]
        d_gate = tf.reduce_sum(d_context * raw, 1, keepdims=True)
        d_alpha = d_alphas[start : start + n]
        d_alpha += tf.einsum("blc,bc->bl", regions[:n], d_context * gate)
        d_scores = alpha * (d_alpha - tf.reduce_sum(alpha * d_alpha, 1, keepdims=True))  # (n, L)
        d_score += tf.matmul(
            tf.reshape(energy, (-1, attention)), tf.reshape(d_scores, (-1, 1)), transpose_a=True
        )
        d_pre = tf.raw_ops.TanhGrad(y=energy, dy=d_scores[:, :, None] * score_row)  # (n, L, A)
        d_both = tf.concat(
            [dz, tf.reduce_sum(d_pre, 1), tf.raw_ops.SigmoidGrad(y=gate, dy=d_gate)], 1
        )  # the gradient of h_prev @ recurrent, (n, 4U + A + 1)
        values = (dz, d_pre, d_both, h_prev)
        collected = tuple(a.write(t, v) for a, v in zip(collected, values, strict=True))
        dh = tf.matmul(d_both, weights.recurrent, transpose_b=True)
        return t - 1, dh, dc * f, d_score, collected

    state = tf.TensorShape([None, units])
    none = tf.zeros([0, units])
    both = 4 * units + attention + 1
    collected = (
        blocks(4 * units),
        blocks(regions_count, attention),
        blocks(both),
        blocks(units),
    )
    _, dh0, dc0, d_score, collected = tf.while_loop(
        lambda t, *_: t >= 0,
        back,
        (steps - 1, none, none, tf.zeros_like(weights.score), collected),
        shape_invariants=(tf.TensorShape([]), state, state, weights.score.shape, (None,) * 4),
    )
    dz, d_pre, d_both, h_prev = (
        packed(a, *shape)
        for a, shape in zip(
            collected, ([4 * units], [regions_count, attention], [both], [units]), strict=True
        )
    )
    rest = [[0, batch - tf.shape(dh0)[0]], [0, 0]]  # rows of empty captions: no gradient
    return (
        dz,  # gates_in, packed like it
        tf.math.unsorted_segment_sum(d_pre, tf.ragged.range(sizes).flat_values, batch),
        tf.pad(dh0, rest),
        tf.pad(dc0, rest),
        tf.matmul(h_prev, d_both, transpose_a=True),  # recurrent
        tf.matmul(zs, dz, transpose_a=True),  # context: zs are the contexts z_t
        d_score,
        tf.reduce_sum(d_both[:, -1:], 0),  # gate_bias
    )
