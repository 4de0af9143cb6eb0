"""Factored rule for ``keras.layers.Embedding``.

The output at position t of example n is row ``ids[n, t]`` of the table E, so example n's
gradient is the scatter-add of its output gradients over its token ids:

    g_kn(E)[v] = Σ_{t : ids[n, t] = v} δ_knt,      Σ_k Σ_n w_kn g_kn(E)[v]²

A token repeated within one example sums BEFORE squaring (the squares of the separate
positions would be a different, wrong quantity).  Only the rows an example touches are
non-zero, so the per-example gradients are never formed as (N, vocabulary, dim): each
example's positions are sorted by id, equal ids form one segment (at most T per example),
the segments are summed, squared, weighted and scattered into the table's rows.  Memory
K·N·T·dim; every shape is static, so it also runs under XLA.

Kronecker factors (``kron``, :class:`fastewc.contract.KroneckerSums`): the lookup is a
Dense layer whose input rows are one-hot, ā_nt = e_{ids[n, t]}, without a bias.  With the
Dense rule's convention (positions as examples, A divided by the L positions, G summed
over them) A is diagonal, the mean token counts per position,

    A = diag(a),   a_v = (1/N) Σ_n (1/L) Σ_t m_nt [ids[n, t] = v],
    G = (1/N) Σ_n Σ_k w_kn Σ_t m_nt δ_knt δ_kntᵀ                          (dim × dim)

and ``a`` is kept as that vector of V floats, never V × V
(:mod:`fastewc.kronecker`'s diagonal form).  m_nt is 0 at a masked position (a padding
row of the batch, or id 0 of an Embedding with ``mask_zero=True``): it counts in neither
factor, while L stays the number of positions, as for a Dense layer over a sequence.
Cost: a scatter of N·L counts and one (dim × K·N·L)(K·N·L × dim) matmul.
"""
import keras
import tensorflow as tf

from fastewc.contract import KroneckerSums, gram, unit_weights
from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import check_plain, leading_dims


def _segments(ids):
    """For ids (N, T): each position's segment in [0, N·T) (one per distinct id of an
    example) and each segment's token id (0 for unused segments)."""
    n, t = tf.shape(ids)[0], tf.shape(ids)[1]
    order = tf.argsort(ids, axis=1, stable=True)
    sorted_ids = tf.gather(ids, order, batch_dims=1)
    starts = tf.concat([tf.ones([n, 1], tf.int32),
                        tf.cast(sorted_ids[:, 1:] != sorted_ids[:, :-1], tf.int32)], axis=1)
    local = tf.cumsum(starts, axis=1) - 1                                   # sorted order
    seg_sorted = local + tf.range(n)[:, None] * t
    seg = tf.gather(seg_sorted, tf.argsort(order, axis=1), batch_dims=1)    # original order
    num = n * t
    token = tf.math.unsorted_segment_max(tf.reshape(ids, [-1]), tf.reshape(seg, [-1]), num)
    return seg, tf.maximum(token, 0), num


def embedding_rule(layer, inputs, *args, **kwargs):
    return lookup_rule(layer, inputs, keras.layers.Embedding.call, "Embedding")


def lookup_rule(layer, inputs, forward, family):
    """The Embedding rule with ``forward(layer, ids)`` as the lookup (a subclass's own
    forward, e.g. ReversibleEmbedding's, which also sets the padding mask)."""
    outputs, ids = lookup(layer, inputs, forward, family)
    table = layer.embeddings

    def sum_sq(delta, weight):
        return [(table, row_square_sums(ids, delta, weight, layer.input_dim))]

    def kron(delta, weight, mask):
        return [lookup_kronecker_sums(layer, ids, delta, weight, mask)]

    return RuleOutput(outputs, outputs, sum_sq=sum_sq, kron=kron)


def lookup_kronecker_sums(layer, ids, delta, weight, mask):
    """The :class:`fastewc.contract.KroneckerSums` of a lookup into ``layer.embeddings``
    (V, D) at ``ids`` (N, ...) in [0, V) with deltas (K, N, ..., D), the cotangents'
    ``weight`` (K, N) and the rows' ``mask`` (N,) (the module docstring):
    a = Σ_n (1/L) Σ_t m_nt e_{ids[n, t]} (V,), g = Σ_kn w_kn Σ_t m_nt δ_knt δ_kntᵀ (D, D).
    Also used by :mod:`fastewc.rules.hub` (a ReversibleEmbedding's lookup)."""
    (k, n), dim = leading_dims(delta), delta.shape[-1]
    flat_ids = tf.reshape(ids, [n, -1])                                   # (N, L)
    positions = flat_ids.shape[1] if flat_ids.shape[1] is not None else tf.cast(tf.shape(flat_ids)[1], tf.float32)
    present = tf.broadcast_to(tf.reshape(mask, [-1, 1]), tf.shape(flat_ids))
    if layer.mask_zero:
        present = present * tf.cast(flat_ids != 0, tf.float32)
    a = tf.math.unsorted_segment_sum(tf.reshape(present, [-1]), tf.reshape(flat_ids, [-1]),
                                     layer.input_dim) / positions
    deltas = tf.reshape(delta, [k, n, -1, dim]) * present[None, :, :, None]
    flat = tf.reshape(deltas, [-1, dim])
    if unit_weights(weight):
        g = gram(flat)
    else:
        g = tf.matmul(tf.reshape(deltas * weight[:, :, None, None], [-1, dim]), flat, transpose_a=True)
    return KroneckerSums((layer.embeddings,), a, g)


def lookup(layer, inputs, forward, family):
    """``(outputs, ids)`` of the lookup ``forward(layer, ids)``: ``ids`` the rows read,
    int32 in [0, input_dim)."""
    check_plain(layer, family)
    if isinstance(inputs, (tf.SparseTensor, tf.RaggedTensor)):
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({family}) received {type(inputs).__name__} ids; the "
            "factored Fisher rule supports dense id tensors only. Use method='vmap'.")
    # Ids outside the table are clamped to it (as XLA's gather would): the engines count and
    # report them (fastewc.engines.base.IdGuard), so the planning pass does not fail on them.
    ids = tf.cast(inputs, tf.int32)
    ids = tf.clip_by_value(ids, -layer.input_dim, layer.input_dim - 1)
    outputs = forward(layer, ids)
    return outputs, tf.where(ids < 0, ids + layer.input_dim, ids)       # as keras.ops.take


def row_square_sums(ids, delta, weight, num_rows):
    """Σ_k Σ_n weight[k, n] · g_kn[v]² for every row v of a (num_rows, D) table read at
    ``ids`` (N, ...) in [0, num_rows), with δ (K, N, ..., D) the gradients of the rows
    read: g_kn[v] = Σ_{positions p of example n with ids[n, p] = v} δ_knp, summed before
    squaring.  Returns (num_rows, D) float32.  Also used by :mod:`fastewc.rules.hub`."""
    (k, n), dim = leading_dims(delta), delta.shape[-1]
    flat_ids = tf.reshape(ids, [n, -1])                                   # (N, T)
    seg, token, num = _segments(flat_ids)
    d = tf.transpose(tf.reshape(delta, [k, n, -1, dim]), [1, 2, 0, 3])    # (N, T, K, D)
    g = tf.math.unsorted_segment_sum(d, seg, num)                         # (N·T, K, D)
    w = tf.repeat(tf.transpose(weight), tf.shape(flat_ids)[1], axis=0)    # (N·T, K)
    rows = tf.einsum("sk,skd->sd", w, tf.square(g))
    return tf.math.unsorted_segment_sum(rows, token, num_rows)


register_rule(keras.layers.Embedding, embedding_rule)
