"""Factored rule for ConvNeXt's ``LayerScale`` (``keras.applications.convnext``): z = x ⊙ γ,
γ of shape (channels,) broadcast over every other axis of x (N, ..., channels).

Example n's gradient sums over its positions BEFORE squaring:

    g_kn(γ) = Σ_positions δ_kn ⊙ x_n

It is returned through the generic per-example contract (:class:`fastewc.registry.RuleOutput`
``per_example``): K·N·channels floats, and the engine forms Σ_k Σ_n w_kn g_kn².  Registered
only when this Keras has the class.
"""
import tensorflow as tf

from fastewc import _keras_compat
from fastewc.registry import RuleOutput, register_rule


def layer_scale_rule(layer, inputs, *args, **kwargs):
    outputs = inputs * layer.gamma
    x = tf.cast(inputs, tf.float32)

    def per_example(delta):                          # (K, N, ..., C) -> (K, N, C)
        return [(layer.gamma, tf.reduce_sum(delta * x[None], axis=list(range(2, delta.shape.rank - 1))))]

    return RuleOutput(outputs, outputs, per_example=per_example)


if _keras_compat.layer_scale_class() is not None:
    register_rule(_keras_compat.layer_scale_class(), layer_scale_rule)
