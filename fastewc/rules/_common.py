"""Helpers shared by the factored rules: configuration checks and weighted square sums.

Every rule ends in the same contraction: given example n's gradient g_kn for cotangent k,

    Σ_k Σ_n w_kn · g_kn²

:func:`weighted_square_sum` computes it from a (K, N, *shape) tensor of per-example
gradients without assuming anything about the sign of w.
"""
import tensorflow as tf

from fastewc.registry import KroneckerSums, UnsupportedLayerError


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


def masked_rows(inputs, mask):
    """``inputs`` (N, ...) with the padding rows (mask 0) zeroed: the rows a Kronecker
    factor is formed from (mask² = mask, so A = Σ rowsᵀ rows needs no second mask).
    Masking the layer input costs less than masking its patches."""
    return inputs * tf.reshape(mask, [-1] + [1] * (inputs.shape.rank - 1))


def kronecker_sums(variables, rows, deltas, weight, mask, *, bias):
    """The :class:`fastewc.registry.KroneckerSums` of a layer whose weight matrix maps input
    rows to output rows: ``rows`` (N, L, d) (float32; L positions per example; padding
    rows already zero, :func:`masked_rows`), ``deltas`` (K, N, L, u), ``weight`` (K, N),
    ``mask`` (N,).  With ``bias`` each row gets a 1 appended (the bias is the weight
    matrix's last row), without building the (N·L, d + 1) rows:

        a = [[Σ āāᵀ/L, Σ a/L], [·ᵀ, Σ m]],    g = Σ_kn w_kn Σ_l δ_knl δ_knlᵀ.

    Cost: two matmuls, (d × N·L)(N·L × d) and (u × K·N·L)(K·N·L × u)."""
    d, u = rows.shape[-1], deltas.shape[-1]
    positions = rows.shape[1] if rows.shape[1] is not None else tf.cast(tf.shape(rows)[1], tf.float32)
    flat = tf.reshape(rows, [-1, d])
    a = tf.matmul(flat, flat, transpose_a=True) / positions
    if bias:
        column = tf.reduce_sum(flat, axis=0)[:, None] / positions
        corner = tf.reshape(tf.reduce_sum(mask), [1, 1])
        a = tf.concat([tf.concat([a, column], 1), tf.concat([tf.transpose(column), corner], 1)], 0)
    flat_deltas = tf.reshape(deltas, [-1, u])
    weighted = tf.reshape(deltas * weight[:, :, None, None], [-1, u])
    g = tf.matmul(weighted, flat_deltas, transpose_a=True)
    return KroneckerSums(tuple(variables), a, g)
