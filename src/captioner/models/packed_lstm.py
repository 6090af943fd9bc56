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

from captioner.models.shared import lstm_gates, lstm_update


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
            h_before, c_before = (before(states, packing.previous) for states in (hs, cs))
            gates = lstm_gates(z)  # i, f, g, o
            factors, d_c_from_h = gate_factors(gates, c_before, cs)
            d_z, *_ = backward(d_hs, factors, d_c_from_h, gates[1], packing.sizes, recurrent_kernel)
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


def before(states, previous, initial=None):
    """Packed states (N, U) -> each position's state one step earlier (N, U): at step 0 the
    initial state (n_0, U), its rows in step 0's order, or zeros without one."""
    if initial is None:
        with_zero = tf.concat([states, tf.zeros((1, states.shape[1]), states.dtype)], 0)
        return tf.gather(with_zero, previous)
    first = tf.shape(initial)[0]  # step 0's positions are the first n_0
    return tf.concat([initial, tf.gather(states, previous[first:])], 0)


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
    return concat(zs, [4 * width], dtype), concat(hs, [width], dtype), concat(cs, [width], dtype)


def gate_factors(gates, c_before, cs) -> tuple:
    """What the backward recurrence multiplies by, for all positions at once (no recurrence in
    them): the gates after their activations (i, f, g, o, each (N, U)), the cell states one step
    earlier and the cell states (N, U) -> factors (N, 4U) = d(c, c, c, h)/d z, gate by gate
    (d z = [d c, d c, d c, d h] * factors), and d_c_from_h (N, U) = o * (1 - tanh(c)^2)."""
    i, f, g, o = gates
    tanh_c = tf.tanh(cs)
    factors = tf.concat(
        [g * i * (1 - i), c_before * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], 1
    )  # (N, 4U)
    return factors, o * (1 - tanh_c * tanh_c)


def backward(
    d_hs, factors, d_c_from_h, forget, sizes, recurrent_kernel, earlier=None, collect=(), sums=()
):
    """The recurrence backwards, from the last step to the first: d h (N, U) from the outputs,
    gate_factors' factors and d_c_from_h, the forget gate f (N, U) -> d z (N, 4U), the gradient of
    the pre-activation gates; d h and d c (n_0, U) of the initial state; what `earlier` collects
    and what it sums.

    earlier(t, d_z, take, size) -> (d h one step earlier (size, U), a tuple of tensors to collect,
    a tuple of tensors to sum) replaces the plain LSTM's d z @ recurrent_kernel^T (the attention
    LSTM's h_{t-1} also feeds its attention); take(x) is the step's rows of a packed tensor x
    (N, ...), size their number. collect: the shapes of the collected tensors but their first
    dimension; they come back as the steps' blocks concatenated, step 0 first. sums: the shapes
    of the summed (size, ...) tensors but their first dimension; they come back as their sums over
    the steps, row by row (n_0, ...), summed in the loop as d h is (no full-size accumulator).
    """
    units = recurrent_kernel.shape[0]
    steps = tf.shape(sizes)[0]
    offsets = tf.cumsum(sizes, exclusive=True)
    if earlier is None:

        def earlier(t, d_z, take, size):
            return tf.matmul(d_z, recurrent_kernel, transpose_b=True), (), ()

    def step(t, d_h_next, d_c_next, summed, d_zs, collected):
        start, size = offsets[t], sizes[t]
        begin, end = tf.reshape(start, [1]), tf.reshape(start + size, [1])

        def take(packed):  # the step's rows (a view: no copy when aligned)
            return tf.strided_slice(packed, begin, end)

        # rows ending at t: zeros. (Their count from sizes, not from d_h_next's shape, which
        # Grappler's constant folding gets wrong when the lengths are constants.)
        ending = size - tf.reduce_sum(sizes[t + 1 : t + 2])

        def grown(x):  # (n_{t+1}, ...) -> (n_t, ...), zeros for the rows ending at t
            return tf.pad(x, [[0, ending]] + [[0, 0]] * (x.shape.rank - 1))

        d_h = take(d_hs) + grown(d_h_next)  # (n, U)
        d_c = grown(d_c_next) + d_h * take(d_c_from_h)
        d_z = tf.concat([d_c, d_c, d_c, d_h], 1) * take(factors)  # (n, 4U)
        d_h_before, extras, terms = earlier(t, d_z, take, size)
        d_c_before = d_c * take(forget)
        return (
            t - 1,
            d_h_before,
            d_c_before,
            tuple(grown(total) + term for total, term in zip(summed, terms, strict=True)),
            d_zs.write(t, d_z),
            tuple(array.write(t, extra) for array, extra in zip(collected, extras, strict=True)),
        )

    def nothing(*shape):  # no rows yet
        return tf.zeros((0, *shape), d_hs.dtype)

    *_, d_h0, d_c0, summed, d_zs, collected = tf.while_loop(
        lambda t, *_: t >= 0,
        step,
        (
            steps - 1,
            nothing(units),
            nothing(units),
            tuple(nothing(*shape) for shape in sums),
            blocks(steps, d_hs.dtype, [4 * units]),
            tuple(blocks(steps, d_hs.dtype, shape) for shape in collect),
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, units]),
            tf.TensorShape([None, units]),
            tuple(tf.TensorShape([None, *shape]) for shape in sums),
            tf.TensorShape(None),
            (tf.TensorShape(None),) * len(collect),
        ),
    )
    return (
        concat(d_zs, [4 * units], d_hs.dtype),
        d_h0,
        d_c0,
        tuple(concat(a, shape, d_hs.dtype) for a, shape in zip(collected, collect, strict=True)),
        summed,
    )


def blocks(steps, dtype, shape) -> tf.TensorArray:
    """A TensorArray of one (n_t, *shape) block per step."""
    element = tf.TensorShape([None, *shape])
    return tf.TensorArray(dtype, size=steps, infer_shape=False, element_shape=element)


def concat(array: tf.TensorArray, shape, dtype):
    """The steps' (n_t, *shape) blocks of a TensorArray as one (N, *shape) tensor (N may be 0)."""
    shape = [*shape]
    packed = tf.cond(array.size() > 0, array.concat, lambda: tf.zeros((0, *shape), dtype))
    return tf.ensure_shape(packed, (None, *shape))
