"""Factored rules for LayerNormalization, BatchNormalization (inference),
GroupNormalization and RMS normalizations (Keras' and keras_hub's, :func:`rms_norm_rule`).

Each computes y = x̂ ⊙ γ + β with a normalised input x̂ that does not depend on γ, β
(per example and its normalisation group for Layer/GroupNormalization; the moving
statistics for BatchNormalization in inference mode).  Example n's gradients sum over
every position that shares a parameter BEFORE squaring:

    g_kn(γ) = Σ_positions δ_kn ⊙ x̂_n,      g_kn(β) = Σ_positions δ_kn,
    Σ_k Σ_n w_kn g_kn²

The outputs come from the layer's own ``call`` (identical by construction); x̂ is
recomputed in float32 with the same formula for the gradients.  BatchNormalization
called with ``training=True`` raises: batch statistics make per-example gradients
meaningless, and fastewc runs the Fisher with ``training=False``.
"""
import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, register_rule
from fastewc.rules._common import (check_inference, leading_dims, static_or_dynamic_shape,
                                   weighted_square_sum)


def _affine_pairs(layer, xhat, delta, weight, param_axes, param_shape, *, gamma=None, beta=None):
    """(γ, β) pairs: δ (K, N, *x) summed over the non-parameter axes of x, per example.
    ``gamma`` / ``beta``: the variables (default ``layer.gamma`` / ``layer.beta``)."""
    gamma = layer.gamma if gamma is None else gamma
    beta = getattr(layer, "beta", None) if beta is None else beta
    rank = xhat.shape.rank                                   # x's rank, batch included
    keep = {a % rank for a in param_axes}
    summed = [a + 1 for a in range(1, rank) if a not in keep]     # δ axes (K leads)

    def per_example(t):
        t = tf.reduce_sum(t, axis=summed) if summed else t
        return tf.reshape(t, list(leading_dims(t)) + list(param_shape))

    pairs = []
    if gamma is not None:
        pairs.append((gamma, weighted_square_sum(per_example(delta * xhat[None]), weight)))
    if beta is not None:
        pairs.append((beta, weighted_square_sum(per_example(delta), weight)))
    return pairs


# -- LayerNormalization -------------------------------------------------------------------
def layer_norm_rule(layer, inputs, *args, **kwargs):
    outputs = keras.layers.LayerNormalization.call(layer, inputs, *args, **kwargs)
    x = tf.cast(inputs, tf.float32)
    axes = [a % x.shape.rank for a in layer.axis]
    mean, variance = keras.ops.moments(x, axes=axes, keepdims=True)
    if layer.rms_scaling:           # as keras.ops.layer_normalization: x / sqrt(var + ε)
        xhat = x * tf.math.rsqrt(variance + layer.epsilon)
    else:
        xhat = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
    shape = [x.shape[a] for a in axes]

    def sum_sq(delta, weight):
        return _affine_pairs(layer, xhat, delta, weight, axes, shape)

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


# -- RMS normalization ---------------------------------------------------------------------
def rms_norm_rule(layer, inputs, *args, **kwargs):
    """RMS normalization with a learned scale s: y = x̂ ⊙ s (Keras' RMSNormalization,
    keras_hub's Llama / Mistral / Qwen / Phi-3 norms) or y = x̂ ⊙ (1 + s) (Gemma's), with
    x̂ = x · rsqrt(mean(x²) + ε) over ``layer.axis`` (default the last axis).  Either way
    g_kn(s) = Σ_positions δ_kn ⊙ x̂_n.  The outputs come from the layer's own ``call``."""
    outputs = type(layer).call(layer, inputs, *args, **kwargs)
    x = tf.cast(inputs, tf.float32)
    axis = getattr(layer, "axis", -1)
    axes = sorted(a % x.shape.rank for a in (axis if isinstance(axis, (list, tuple)) else [axis]))
    xhat = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=axes, keepdims=True) + layer.epsilon)
    shape = [x.shape[a] for a in axes]

    def sum_sq(delta, weight):
        return _affine_pairs(layer, xhat, delta, weight, axes, shape, gamma=layer.scale)

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


# -- BatchNormalization (inference) -------------------------------------------------------
def batch_norm_rule(layer, inputs, training=None, mask=None):
    check_inference(layer, "BatchNormalization", training)
    outputs = keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    x = tf.cast(inputs, tf.float32)
    axis = layer.axis % x.shape.rank
    shape = [1] * x.shape.rank
    shape[axis] = x.shape[axis]
    mean = tf.reshape(tf.cast(layer.moving_mean, tf.float32), shape)
    variance = tf.reshape(tf.cast(layer.moving_variance, tf.float32), shape)
    xhat = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def sum_sq(delta, weight):
        return _affine_pairs(layer, xhat, delta, weight, [axis], [x.shape[axis]])

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


# -- GroupNormalization -------------------------------------------------------------------
def group_norm_rule(layer, inputs, *args, **kwargs):
    outputs = keras.layers.GroupNormalization.call(layer, inputs, *args, **kwargs)
    x = tf.cast(inputs, tf.float32)
    rank = x.shape.rank
    axis = layer.axis % rank
    channels = x.shape[axis]
    shape = static_or_dynamic_shape(x)
    grouped = tf.reshape(x, shape[:axis] + [layer.groups, channels // layer.groups] + shape[axis + 1:])
    reduce = [a for a in range(1, rank + 1) if a != axis]
    mean, variance = keras.ops.moments(grouped, axes=reduce, keepdims=True)
    xhat = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), shape)

    def sum_sq(delta, weight):
        return _affine_pairs(layer, xhat, delta, weight, [axis], [channels])

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


register_rule(keras.layers.LayerNormalization, layer_norm_rule)
register_rule(keras.layers.BatchNormalization, batch_norm_rule)
register_rule(keras.layers.GroupNormalization, group_norm_rule)
if hasattr(keras.layers, "RMSNormalization"):
    register_rule(keras.layers.RMSNormalization, rms_norm_rule)
