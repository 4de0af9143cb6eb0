"""Factored rules for the embedding layers of keras_hub's transformer backbones.

``keras.layers.ReversibleEmbedding`` (keras_hub's ``ReversibleEmbedding`` subclasses it)
has a table E (vocabulary V × dim D) and two modes.

* Forward (``reverse=False``): o_nt = E[ids_nt], an Embedding lookup, so example n's
  gradient is the scatter-add of its output gradients over its ids, summed over repeated
  ids before squaring (:func:`fastewc.rules.embedding.row_square_sums`):

      g_kn(E)[v] = Σ_{t : ids_nt = v} δ_knt

* Reverse (``reverse=True``): logits z_nt = h_nt Eᵀ (tied weights) or h_nt R (untied, R
  of D × V), optionally soft-capped afterwards, c·tanh(z / c).  With δ_knt = ∂/∂z_nt
  (the probe is z, before the cap) it is a Dense layer without bias on Eᵀ:

      g_kn(E) = Σ_t δ_kntᵀ h_nt  (V × D),     g_kn(R) = Σ_t h_ntᵀ δ_knt  (D × V)

  For h of rank 2 (one position per example) each entry is a single product and the
  squares factor, Σ_kn w_kn g_kn(E)² = (Σ_k w_k ⊙ δ_k ⊙ δ_k)ᵀ (h ⊙ h); over a sequence
  the per-example gradients (K·N·V·D floats) are formed, squared and weighted.

A ReversibleEmbedding used both ways in one forward pass (a tied language-model head)
is a shared layer: :func:`fastewc.capture.capture` raises SharedLayerError and
``method="auto"`` uses vmap.

``keras_hub.layers.PositionEmbedding`` (a table P of sequence_length × D) outputs, for
inputs of shape (N, ..., T, D), the rows p_t = start_index + t broadcast over the batch
(or the rows given by ``positions``).  Example n reads row p_t at position t:

      g_kn(P)[p] = Σ_{positions with row p} δ_kn,      Σ_k Σ_n w_kn g_kn(P)[p]²

For inputs (N, T, D) without ``positions`` the rows of one example are distinct, so the
squares need no per-example scatter: row start_index + t gets Σ_kn w_kn δ_knt².
Otherwise the Embedding machinery above does the per-example scatter.

The keras_hub rules are registered only when ``import keras_hub`` succeeds; the
ReversibleEmbedding rule whenever Keras has that layer.
"""
import warnings

import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import check_plain, weighted_square_sum
from fastewc.rules.embedding import lookup_rule, row_square_sums

_ReversibleEmbedding = getattr(keras.layers, "ReversibleEmbedding", None)


# -- ReversibleEmbedding -----------------------------------------------------------------
def _forward_lookup(layer, ids):
    # The layer's own forward mode: the lookup, and the padding mask it sets itself.
    return _ReversibleEmbedding.call(layer, ids, reverse=False)


def reversible_embedding_rule(layer, inputs, reverse=False):
    result = _reversible_embedding(layer, inputs, reverse)
    if layer.tie_weights:
        return result
    # Untied: the table this mode does not read has a zero gradient in this pass.
    unused = layer.reverse_embeddings if not reverse else layer.embeddings

    def sum_sq(delta, weight):
        return result.sum_sq(delta, weight) + [(unused, tf.zeros(unused.shape, tf.float32))]

    return result._replace(sum_sq=sum_sq)


def _reversible_embedding(layer, inputs, reverse):
    if not reverse:
        return lookup_rule(layer, inputs, _forward_lookup, "ReversibleEmbedding")
    check_plain(layer, "ReversibleEmbedding")
    tied = layer.tie_weights
    kernel = tf.transpose(layer.embeddings) if tied else layer.reverse_embeddings    # (D, V)
    h = inputs
    if layer.reverse_dtype is not None:
        h, kernel = tf.cast(h, layer.reverse_dtype), tf.cast(kernel, layer.reverse_dtype)
    z = keras.ops.matmul(h, kernel)
    outputs = z
    if layer.logit_soft_cap is not None:
        cap = layer.logit_soft_cap
        outputs = keras.ops.multiply(keras.ops.tanh(keras.ops.divide(z, cap)), cap)
    variable = layer.embeddings if tied else layer.reverse_embeddings
    a = tf.cast(h, tf.float32)

    def sum_sq(delta, weight):
        if a.shape.rank == 2:
            d = tf.einsum("kn,knv->nv", weight, tf.square(delta))
            sq = tf.matmul(d, tf.square(a), transpose_a=True)                    # (V, D)
        else:
            a3 = tf.reshape(a, [tf.shape(a)[0], -1, a.shape[-1]])
            d3 = tf.reshape(delta, [tf.shape(delta)[0], tf.shape(delta)[1], -1, delta.shape[-1]])
            sq = weighted_square_sum(tf.einsum("ntd,kntv->knvd", a3, d3), weight)
        return [(variable, sq if tied else tf.transpose(sq))]

    return RuleOutput(outputs, z, sum_sq=sum_sq)


# -- PositionEmbedding -------------------------------------------------------------------
def _serving_positions():
    """The positions keras_hub's PositionEmbedding reads when none are passed: None except
    under its vLLM serving context.  That lookup is a private keras_hub function
    (``keras_hub.src.layers.modeling.position_embedding._vllm_serving_positions``), read
    here so that the rule sees the same rows as the layer's own ``call``; absent (older
    keras_hub), there is no serving context and the answer is None."""
    try:
        from keras_hub.src.layers.modeling import position_embedding   # noqa: PLC0415
    except ImportError:
        return None
    lookup = getattr(position_embedding, "_vllm_serving_positions", None)
    return lookup() if lookup is not None else None


def position_embedding_rule(layer, inputs, start_index=0, positions=None):
    check_plain(layer, "PositionEmbedding")
    if positions is None:
        positions = _serving_positions()
    own_call = _position_embedding_class().call
    outputs = own_call(layer, inputs, start_index=start_index, positions=positions)
    table = layer.position_embeddings
    rows = int(layer.sequence_length)
    shape = tf.shape(outputs)
    rank = outputs.shape.rank
    if rank is None or rank < 3:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' (PositionEmbedding) received inputs of rank {rank}; the "
            "factored Fisher rule needs (batch, ..., sequence, features). Use method='vmap'.")

    if positions is None:
        t = shape[-2]
        ids = tf.cast(start_index, tf.int32) + tf.range(t, dtype=tf.int32)          # (T,)
        if rank == 3:
            def sum_sq(delta, weight):
                sq = tf.einsum("kn,kntd->td", weight, tf.square(tf.cast(delta, tf.float32)))
                return [(table, tf.math.unsorted_segment_sum(sq, ids, rows))]
            return RuleOutput(outputs, outputs, sum_sq=sum_sq)
    else:
        ids = tf.cast(positions, tf.int32)
        if ids.shape.rank == 1:
            ids = ids[None]
        ids = tf.where(ids < 0, ids + rows, ids)                                   # as ops.take
    ids = tf.broadcast_to(ids, shape[:-1])       # the rows each output position reads

    def sum_sq(delta, weight):
        return [(table, row_square_sums(ids, delta, weight, rows))]

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


def _position_embedding_class():
    import keras_hub   # noqa: PLC0415 -- only reached with keras_hub installed
    return keras_hub.layers.PositionEmbedding


def _register():
    if _ReversibleEmbedding is not None:
        # keras_hub's ReversibleEmbedding subclasses it without its own call: it inherits the rule.
        register_rule(_ReversibleEmbedding, reversible_embedding_rule)
    try:
        import keras_hub   # noqa: PLC0415 -- optional dependency
        position_embedding = keras_hub.layers.PositionEmbedding
    except ImportError:
        return
    except Exception as err:   # noqa: BLE001 -- a broken keras_hub must not break fastewc
        warnings.warn(f"fastewc: keras_hub is installed but failed to import ({err!r}); its "
                      "layers get no factored Fisher rule.", stacklevel=2)
        return
    register_rule(position_embedding, position_embedding_rule)


_register()
