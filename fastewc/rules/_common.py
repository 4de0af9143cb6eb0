"""Helpers shared by the factored rules: configuration checks and weighted square sums.

Every rule ends in the same contraction: given example n's gradient g_kn for cotangent k,

    Σ_k Σ_n w_kn · g_kn²

:func:`weighted_square_sum` (in :mod:`fastewc.contract`, re-exported here) computes it
from a (K, N, *shape) tensor of per-example gradients without assuming anything about the
sign of w.
"""
import string

import tensorflow as tf

from fastewc.contract import (KroneckerSums, UnsupportedLayerError, few_rows, gram,  # noqa: F401
                              row_gram, static_or_dynamic_shape, unit_weights, weighted_rows,
                              weighted_square_sum)


def check_plain(layer, family, *, lora=False):
    """Raise for quantized layers, and for LoRA ones unless ``lora`` (the rule covers the
    LoRA factors, :func:`lora_square_sums`): their trainable weights are not ``layer.kernel``."""
    if (getattr(layer, "lora_enabled", False) and not lora) or getattr(layer, "quantization_mode", None):
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) uses LoRA or quantization, which the factored "
            "Fisher rule does not cover. Use method='vmap'.")


def lora_square_sums(layer, a, delta, weight, in_spec, kernel_spec, out_spec):
    """The (lora_kernel_a, Σ w g²), (lora_kernel_b, Σ w g²) pairs of a LoRA-enabled Dense or
    EinsumDense layer (Keras 3's ``enable_lora``: the base kernel W is frozen and the layer
    uses W + s·A·B, s = lora_alpha / lora_rank, A of shape kernel[:-1] + (r,), B of (r,
    kernel[-1])).  With G_kn = einsum(<in>,k<out> -> kn<kernel>)(a, δ) the per-example
    gradient of the effective kernel:

        g_kn(A) = s · Σ_e G_kn[..., e] B[ρ, e],      g_kn(B) = s · Σ_... A[..., ρ] G_kn[..., e]

    each one three-operand einsum on (a, δ, B) or (a, δ, A) that never forms G_kn: the
    per-example gradients are K·N·(|A| + |B|) floats, small for a small rank.  ``a`` the
    float32 input, ``delta`` (K, N, *output), specs as :func:`einsum_dense.parse_equation`."""
    used = set(in_spec + kernel_spec + out_spec)
    k, rho = [c for c in string.ascii_letters if c not in used][:2]
    a_spec, b_spec = kernel_spec[:-1] + rho, rho + kernel_spec[-1]
    s = layer.lora_alpha / layer.lora_rank
    factor_a, factor_b = layer.lora_kernel_a, layer.lora_kernel_b
    g_a = tf.einsum(f"{in_spec},{k}{out_spec},{b_spec}->{k}{in_spec[0]}{a_spec}", a, delta,
                    tf.cast(factor_b, tf.float32))
    g_b = tf.einsum(f"{in_spec},{k}{out_spec},{a_spec}->{k}{in_spec[0]}{b_spec}", a, delta,
                    tf.cast(factor_a, tf.float32))
    return [(factor_a, s * s * weighted_square_sum(g_a, weight)),
            (factor_b, s * s * weighted_square_sum(g_b, weight))]


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


# Where pairs of positions beat per-example gradients, from a side-by-side measurement
# (README, "Real models": pairs of positions): with one cotangent up to L = 8 positions,
# with 9 cotangents up to L = 15 (per-example cost is nearly flat in L: it is the K·N·I·F
# memory traffic; the pairs' cost grows as L²).
PAIR_BUDGET = 36                 # pairs always taken up to this many (L = 8)
PAIR_BUDGET_PER_COTANGENT = 14   # ... and up to this many per cotangent (K = 9: L = 15)


def use_position_pairs(positions, k, *, elementwise=False):
    """Whether pairs of positions (:func:`position_pair_square_sum`) beat forming per-example
    gradients for ``positions`` positions and ``k`` cotangents (static Python ints, else
    False).  ``elementwise``: the per-position product is elementwise, not a matmul
    (depthwise kernels), so the pairs pay only while P = L(L + 1)/2 ≤ K·L."""
    if not isinstance(positions, int) or not isinstance(k, int):
        return False
    pairs = positions * (positions + 1) // 2
    if elementwise:
        return pairs <= k * positions
    return pairs <= max(PAIR_BUDGET, PAIR_BUDGET_PER_COTANGENT * k)


def position_pairs(positions):
    """The pairs (l, m), l ≤ m, of ``positions`` positions, as two index lists, and their
    multiplicity c_lm (1 on the diagonal, 2 off it: the pair (m, l) is folded into (l, m))."""
    pairs = [(l, m) for l in range(positions) for m in range(l, positions)]
    first, second = [p[0] for p in pairs], [p[1] for p in pairs]
    return first, second, tf.constant([1.0 if l == m else 2.0 for l, m in pairs])


def pair_products(t, axis, positions):
    """(t_l ⊙ t_m) for every pair l ≤ m of the ``positions`` entries of ``t`` along ``axis``
    (which becomes the pair axis, length L(L + 1)/2), and the multiplicities c_lm."""
    if positions == 1:
        return tf.square(t), tf.ones([1])
    first, second, multiplicity = position_pairs(positions)
    return tf.gather(t, first, axis=axis) * tf.gather(t, second, axis=axis), multiplicity


def weighted_delta_pairs(delta, weight):
    """C_nlm = c_lm Σ_k w_kn δ_knl ⊙ δ_knm for ``delta`` (K, N, L, ...): (N, P, ...)."""
    products, multiplicity = pair_products(delta, 2, delta.shape[2])
    tail = [1] * (delta.shape.rank - 3)
    # Elementwise, not an einsum: oneDNN turns "kn,knp...->np..." into N tiny matmuls.
    w = tf.reshape(weight, static_or_dynamic_shape(weight) + [1, *tail])
    c = w[0] * products[0] if delta.shape[0] == 1 else tf.reduce_sum(w * products, axis=0)
    return c * tf.reshape(multiplicity, [1, -1] + tail)


def position_pair_square_sum(rows, delta, weight):
    """Σ_kn w_kn (Σ_l rows_nl ⊗ δ_knl)², shape (I, F), for ``rows`` (N, L, I) and ``delta``
    (K, N, L, F) with a small static L, WITHOUT per-example gradients.  Squaring the sum
    over positions expands into pairs of positions:

        Σ_n Σ_{l≤m} (rows_nl ⊙ rows_nm)ᵀ C_nlm,     C_nlm = c_lm Σ_k w_kn δ_knl ⊙ δ_knm,

    one (I × N·P)(N·P × F) matmul, P = L(L + 1)/2, instead of K·N per-example (I × F)
    gradients squared and summed (memory-bound, K·N·I·F floats written and read).  Cost
    N·P·I·F multiply-adds, so it pays while P stays below a few K·L
    (:func:`use_position_pairs`).  At L = 1 it is the Dense identity (a²)ᵀ(Σ_k w δ²)."""
    positions = rows.shape[1]
    products, _ = pair_products(rows, 1, positions)                        # (N, P, I)
    c = weighted_delta_pairs(delta, weight)                                # (N, P, F)
    return tf.matmul(tf.reshape(products, [-1, rows.shape[-1]]),
                     tf.reshape(c, [-1, delta.shape[-1]]), transpose_a=True)


def leading_dims(delta):
    """(K, N) of a (K, N, ...) tensor: Python ints where static, scalar tensors elsewhere."""
    k, n = delta.shape[0], delta.shape[1]
    return (tf.shape(delta)[0] if k is None else k), (tf.shape(delta)[1] if n is None else n)


def masked_rows(inputs, mask):
    """``inputs`` (N, ...) with the padding rows (mask 0) zeroed: the rows a Kronecker
    factor is formed from (mask² = mask, so A = Σ rowsᵀ rows needs no second mask).
    Masking the layer input costs less than masking its patches."""
    return inputs * tf.reshape(mask, [-1] + [1] * (inputs.shape.rank - 1))


def kronecker_sums(variables, rows, deltas, weight, mask, *, bias, input_rank=None):
    """The :class:`fastewc.registry.KroneckerSums` of a layer whose weight matrix maps input
    rows to output rows: ``rows`` (N, L, d) (float32; L positions per example; padding
    rows already zero, :func:`masked_rows`), ``deltas`` (K, N, L, u), ``weight`` (K, N),
    ``mask`` (N,).  With ``bias`` each row gets a 1 appended (the bias is the weight
    matrix's last row; the mask, 0 on padding rows):

        a = [[Σ āāᵀ/L, Σ a/L], [·ᵀ, Σ m]],    g = Σ_kn w_kn Σ_l δ_knl δ_knlᵀ.

    Cost: two Gram products, (d × N·L)(N·L × d) and (u × K·N·L)(K·N·L × u)
    (:func:`fastewc.contract.gram`: one matmul, or its upper blocks where they pay; no pass
    that weighs the deltas where the weights are statically 1, :func:`unit_weights`), and no pass over a
    (d+1)² ``a`` larger than the rows: where the N·L rows are at most d' (statically,
    :func:`fastewc.contract.few_rows`), ``a`` is :func:`fastewc.contract.row_gram` of the
    rows with the bias's column, the 1/L folded into them (the reference CNN's
    Dense(9216 → 128): 256 rows, an 85M-float ``a``); else (a convolution's patches) its
    last row and column are the rows' sums, and a copy of ``a`` joins them.  No division
    where L = 1.  ``input_rank``: :class:`fastewc.contract.KroneckerSums`'s (None:
    a kernel with one output axis); its ``rows`` are ``rows`` with the bias's column (the
    mask) appended, its ``deltas`` ``deltas``."""
    d, u = rows.shape[-1], deltas.shape[-1]
    positions = rows.shape[1] if rows.shape[1] is not None else tf.cast(tf.shape(rows)[1], tf.float32)
    one = isinstance(positions, int) and positions == 1
    per_position = (lambda t: t) if one else (lambda t: t / positions)  # noqa: E731
    flat = tf.reshape(rows, [-1, d])
    if bias:      # the rows with the bias's column (the mask): KroneckerSums.rows
        column = tf.broadcast_to(tf.reshape(mask, [-1, 1, 1]), tf.concat([tf.shape(rows)[:2], [1]], 0))
        rows_with_bias = tf.concat([rows, tf.cast(column, rows.dtype)], -1)
    rows_out = rows_with_bias if bias else rows
    if few_rows(rows_out):
        a = row_gram(rows_out)
    else:
        a = per_position(gram(flat))
        if bias:
            column = per_position(tf.reduce_sum(flat, axis=0)[:, None])
            corner = tf.reshape(tf.reduce_sum(mask), [1, 1])
            a = tf.concat([tf.concat([a, column], 1), tf.concat([tf.transpose(column), corner], 1)], 0)
    flat_deltas = tf.reshape(deltas, [-1, u])
    if unit_weights(weight):
        g = gram(flat_deltas)
    else:
        g = tf.matmul(tf.reshape(deltas * weight[:, :, None, None], [-1, u]), flat_deltas, transpose_a=True)
    return KroneckerSums(tuple(variables), a, g, input_rank, rows_out, deltas)
