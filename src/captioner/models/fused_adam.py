"""Keras' Adam with each variable's update as one fused TensorFlow kernel (ResourceApplyAdam).

keras.optimizers.Adam updates a variable with about ten element-wise ops, each a pass over the
variable and its two moments; TensorFlow's ApplyAdam kernel makes one. Same rule, the same
constants and the same slot variables (so checkpoints carry the same state):

    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m += (g - m) * (1 - beta_1);  v += (g^2 - v) * (1 - beta_2);  w -= alpha * m / (sqrt(v) + eps)

Sparse gradients (an embedding's IndexedSlices, one row per token occurrence) keep Keras' own
update: Keras squares each occurrence's row before adding them up (v gets sum(g_i^2), not
(sum g_i)^2 as the dense kernel would), and the model must learn what it learned before. So do
settings the kernel does not cover (amsgrad, another backend, non-float32 variables).
tests/test_fused_adam.py checks both against keras.optimizers.Adam.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="captioner")
class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose per-variable update is TensorFlow's fused ApplyAdam kernel."""

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        plain = keras.backend.backend() == "tensorflow" and not self.amsgrad
        dense = not isinstance(gradient, tf.IndexedSlices)
        if not (plain and dense and tf.as_dtype(variable.dtype) == tf.float32):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        momentum, velocity = self._momentums[index], self._velocities[index]
        step = tf.cast(self.iterations + 1, tf.float32)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,  # under tf.distribute, in an update call: this device's copy
            m=momentum.handle,
            v=velocity.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, tf.float32), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, tf.float32), step),
            lr=tf.cast(learning_rate, tf.float32),
            beta1=tf.cast(self.beta_1, tf.float32),
            beta2=tf.cast(self.beta_2, tf.float32),
            epsilon=tf.cast(self.epsilon, tf.float32),
            grad=tf.cast(gradient, tf.float32),
        )
