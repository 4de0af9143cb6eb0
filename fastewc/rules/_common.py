"""Helpers shared by the factored rules: configuration checks and weighted square sums.

Every rule ends in the same contraction: given example n's gradient g_kn for cotangent k,

    Σ_k Σ_n w_kn · g_kn²

:func:`weighted_square_sum` computes it from a (K, N, *shape) tensor of per-example
gradients without assuming anything about the sign of w.
"""
import tensorflow as tf

from fastewc.registry import UnsupportedLayerError


def check_plain(layer, family):
    """Raise for LoRA / quantized layers: their trainable weights are not ``layer.kernel``."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) uses LoRA or quantization, which the factored "
            "Fisher rule does not cover. Use method='vmap'.")


def check_channels_last(layer, family):
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format != "channels_last":
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) uses data_format={data_format!r}; the factored "
            "Fisher rule supports data_format='channels_last' only. Use method='vmap' for this "
            "model, or build the layer with data_format='channels_last'.")


def check_inference(layer, family, training):
    if training:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) was called with training={training!r}: the "
            "factored Fisher rule covers inference mode only (per-example gradients of "
            "batch statistics are not per-example). Call the model with training=False.")


def weighted_square_sum(g, weight):
    """Σ_k Σ_n weight[k, n] · g[k, n]² for ``g`` of shape (K, N, *shape): shape ``shape``."""
    g = tf.cast(g, tf.float32)
    if g.shape[0] == 1:
        return tf.tensordot(weight[0], tf.square(g[0]), 1)
    flat = tf.reshape(tf.square(g), [-1] + static_or_dynamic_shape(g)[2:])
    return tf.tensordot(tf.reshape(weight, [-1]), flat, 1)


def static_or_dynamic_shape(t):
    """``t``'s shape as a list: Python ints where static, scalar tensors elsewhere."""
    static = t.shape.as_list()
    if all(d is not None for d in static):
        return static
    dynamic = tf.shape(t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


def leading_dims(delta):
    """(K, N) of a (K, N, ...) tensor: Python ints where static, scalar tensors elsewhere."""
    k, n = delta.shape[0], delta.shape[1]
    return (tf.shape(delta)[0] if k is None else k), (tf.shape(delta)[1] if n is None else n)
