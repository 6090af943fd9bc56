"""A Keras-compatible LSTM over packed sequences: only the real (non-padding) positions computed.

Training batches are shuffled captions padded to their longest, so a (B, T) batch is about half
padding (BENCHMARKS.md), and Keras' LSTM steps every row through every step. Here the B rows are
sorted longest first and laid out step by step ("packed", as PyTorch's PackedSequence):

    packed position p = offsets[t] + k   for step t and the k-th longest row, k < sizes[t]
    sizes[t] = number of rows longer than t (non-increasing), offsets = cumsum of sizes

so step t works on the first sizes[t] rows of the state and the recurrence does exactly N (the
number of real positions) row-steps. The input half of the gates of all positions is one (N, E) x
(E, 4U) matmul before the loop; the loop only multiplies the state by the recurrent kernel. The
backward pass is written out (a second loop, then one matmul each for the input, kernel,
recurrent kernel and bias gradients), not left to autodiff of the loop.

Same function as keras.layers.LSTM with its default activations (tanh, sigmoid), a bias, no
dropout inside the layer, on post-padded sequences: the weights are the Keras layer's own
(kernel (E, 4U), recurrent_kernel (U, 4U), bias (4U,), gates i, f, c, o), and outputs and
gradients at real positions equal Keras' up to float rounding (tests/test_packed_lstm.py).
Positions after a row's end never influence earlier ones, so nothing is lost by not computing them.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from captioner.models.shared import lstm_update


class Packing(NamedTuple):
    """Where each real position of a post-padded (B, T) batch goes in the packed layout.

    index (N, 2) int32: (row, step) of packed position p, so tf.gather_nd(padded, index) packs
    any (B, T, ...) tensor and tf.scatter_nd(index, packed, (B, T, ...)) unpacks it.
    sizes (T,) int32: rows still running at each step, longest first.
    previous (N,) int32: the packed position of the same row one step earlier, or N at step 0
    (an index into a packed tensor with one zero row appended: the initial state).
    """

    index: tf.Tensor
    sizes: tf.Tensor
    previous: tf.Tensor


def supports(layer) -> bool:
    """Whether `lstm` computes what this Keras RNN layer does: an LSTM with the default
    activations and a bias, no dropout inside, running forwards over the whole sequence."""
    import keras

    if not isinstance(layer, keras.layers.LSTM):
        return False
    cell = layer.cell
    return (
        cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and cell.use_bias
        and not (cell.dropout or cell.recurrent_dropout)
        and not (layer.go_backwards or layer.stateful)
    )


def pack(lengths) -> Packing:
    """The packing of rows of the given lengths (B,) (real positions first in each row)."""
    lengths = tf.cast(lengths, tf.int32)
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)  # (B,)
    longest = tf.reduce_max(tf.concat([lengths, [0]], 0))
    steps = tf.range(longest)[:, None]  # (T, 1)
    ranks = tf.range(tf.shape(lengths)[0])[None, :]  # (1, B): k, the k-th longest row
    real = steps < tf.gather(lengths, order)[None, :]  # (T, B), step-major
    sizes = tf.reduce_sum(tf.cast(real, tf.int32), axis=1)  # (T,)
    offsets = tf.cumsum(sizes, exclusive=True)  # (T,)
    grid_rows = tf.broadcast_to(order[None, :], tf.shape(real))
    grid_steps = tf.broadcast_to(steps, tf.shape(real))
    index = tf.stack([tf.boolean_mask(grid_rows, real), tf.boolean_mask(grid_steps, real)], 1)
    # one step earlier: offsets[t - 1] + k, and N (the zero row) at t = 0
    earlier = tf.gather(tf.concat([[0], offsets], 0), tf.squeeze(steps, 1))[:, None] + ranks
    previous = tf.where(steps > 0, earlier, tf.reduce_sum(sizes))
    return Packing(index, sizes, tf.boolean_mask(previous, real))


def lstm_layer(layer, inputs, packing: Packing):
    """`lstm` with the weights of a Keras LSTM layer that `supports` accepts."""
    cell = layer.cell
    return lstm(inputs, packing, cell.kernel, cell.recurrent_kernel, cell.bias)


def lstm(inputs, packing: Packing, kernel, recurrent_kernel, bias):
    """Packed inputs (N, E) -> packed outputs h (N, U) of a Keras LSTM with these weights,
    starting from a zero state; differentiable with respect to the inputs and the weights."""

    @tf.custom_gradient
    def run(inputs, kernel, recurrent_kernel, bias):
        projected = tf.nn.bias_add(tf.matmul(inputs, kernel), bias)  # (N, 4U): all steps at once
        z, hs, cs = _forward(projected, packing.sizes, recurrent_kernel)  # (N, 4U), (N, U) x 2

        def gradient(d_hs):
            h_before, c_before = (_before(states, packing.previous) for states in (hs, cs))
            i, f, g, o = tf.split(z, 4, axis=1)
            i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
            tanh_c = tf.tanh(cs)
            # d z = [d c * d c/d z_i, d c * ..f, d c * ..g, d h * d h/d z_o]: factors without
            # recurrence, computed for all positions at once
            factors = tf.concat(
                [g * i * (1 - i), c_before * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], 1
            )  # (N, 4U)
            d_c_from_h = o * (1 - tanh_c * tanh_c)
            d_z = _backward(d_hs, factors, d_c_from_h, f, packing.sizes, recurrent_kernel)
            return (
                tf.matmul(d_z, kernel, transpose_b=True),  # (N, E)
                tf.matmul(inputs, d_z, transpose_a=True),  # (E, 4U)
                tf.matmul(h_before, d_z, transpose_a=True),  # (U, 4U)
                tf.reduce_sum(d_z, axis=0),  # (4U,)
            )

        return hs, gradient

    return run(
        tf.convert_to_tensor(inputs),
        tf.convert_to_tensor(kernel),
        tf.convert_to_tensor(recurrent_kernel),
        tf.convert_to_tensor(bias),
    )


def _before(states, previous):
    """Packed states (N, U) -> each position's state one step earlier (zeros at step 0)."""
    with_zero = tf.concat([states, tf.zeros((1, states.shape[1]), states.dtype)], 0)
    return tf.gather(with_zero, previous)


def _forward(projected, sizes, recurrent_kernel):
    """The recurrence over shrinking states: the input half of the gates (N, 4U) -> the gates
    before their activations z (N, 4U), h and c (N, U)."""
    width = recurrent_kernel.shape[0]  # U, static
    steps = tf.shape(sizes)[0]
    state = tf.zeros((tf.reduce_max(tf.concat([sizes, [0]], 0)), width), projected.dtype)
    arrays = [tf.TensorArray(projected.dtype, size=steps, infer_shape=False) for _ in range(3)]

    def step(t, start, h, c, zs, hs, cs):
        size = sizes[t]  # the rows still running: the first `size` of the state
        h, c = h[:size], c[:size]
        z = projected[start : start + size] + tf.matmul(h, recurrent_kernel)  # (n, 4U)
        h, c = lstm_update(z, c)
        return t + 1, start + size, h, c, zs.write(t, z), hs.write(t, h), cs.write(t, c)

    state_shape = tf.TensorShape([None, width])
    *_, zs, hs, cs = tf.while_loop(
        lambda t, *_: t < steps,
        step,
        (tf.constant(0), tf.constant(0), state, state, *arrays),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([]),
            state_shape,
            state_shape,
            *[tf.TensorShape(None)] * 3,
        ),
    )
    dtype = projected.dtype
    return _concat(zs, 4 * width, dtype), _concat(hs, width, dtype), _concat(cs, width, dtype)


def _backward(d_hs, factors, d_c_from_h, forget, sizes, recurrent_kernel):
    """The recurrence backwards: d h (N, U) from the outputs -> d z (N, 4U), the gradient of the
    pre-activation gates; factors (N, 4U), d_c_from_h = o * (1 - tanh(c)^2), forget (N, U)."""
    units = tf.shape(recurrent_kernel)[0]
    steps = tf.shape(sizes)[0]
    offsets = tf.cumsum(sizes, exclusive=True)
    d_zs = tf.TensorArray(d_hs.dtype, size=steps, infer_shape=False)
    empty = tf.zeros((0, units), d_hs.dtype)
    shape = tf.TensorShape([None, recurrent_kernel.shape[0]])

    def step(t, d_h_next, d_c_next, d_zs):
        start, size = offsets[t], sizes[t]
        rows = slice(start, start + size)
        grow = tf.stack([[0, size - tf.shape(d_h_next)[0]], [0, 0]])  # rows ending at t: zeros
        d_h = d_hs[rows] + tf.pad(d_h_next, grow)  # (n, U)
        d_c = tf.pad(d_c_next, grow) + d_h * d_c_from_h[rows]
        d_z = tf.concat([d_c, d_c, d_c, d_h], 1) * factors[rows]  # (n, 4U)
        d_h_before = tf.matmul(d_z, recurrent_kernel, transpose_b=True)
        d_c_before = d_c * forget[rows]
        return (
            t - 1,
            *(tf.ensure_shape(d, shape) for d in (d_h_before, d_c_before)),
            d_zs.write(t, d_z),
        )

    *_, d_zs = tf.while_loop(
        lambda t, *_: t >= 0,
        step,
        (steps - 1, empty, empty, d_zs),
        shape_invariants=(
            tf.TensorShape([]),
            shape,
            shape,
            tf.TensorShape(None),
        ),
    )
    return _concat(d_zs, 4 * recurrent_kernel.shape[0], d_hs.dtype)


def _concat(array: tf.TensorArray, width: int, dtype):
    """The steps' (n_t, width) blocks of a TensorArray as one (N, width) tensor (N may be 0)."""
    packed = tf.cond(array.size() > 0, array.concat, lambda: tf.zeros((0, width), dtype))
    return tf.ensure_shape(packed, (None, width))
