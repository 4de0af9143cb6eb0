"""Factored rules for the layers of keras_hub's transformer backbones: embeddings, RMS norms.

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

  Every row of the table gets a rank-T matrix per example, so the squares do not factor:
  with few positions they come from pairs of positions
  (:func:`fastewc.rules._common.position_pair_square_sum`, N·P·(V + D) floats, P =
  T(T + 1)/2; one position is the Dense identity), else from the per-example gradients,
  formed a chunk of examples at a time so that at most ``EXAMPLE_FLOATS`` floats
  (K·V·D per example) are held: N·T·V·D·K multiply-adds, the reverse use's intrinsic cost.

A layer called both ways in one forward pass (a tied language-model head: GPT-2, Gemma)
reads E twice, and example n's gradient is the SUM of both uses, squared afterwards (the
Fisher of a tied weight is not the sum of the squares of its uses).  The calls are merged
into one record (``RuleOutput.merge``: one probe per call) and

    Σ_kn w_kn (L_kn + R_kn)² = Σ w L² + Σ w R² + 2 Σ_kn w_kn L_kn ⊙ R_kn

with L the lookup's sparse gradient (rows of the ids only) and R the reverse use's.  The
cross term is linear in L, so it needs R only at the rows example n looked up:

    2 Σ_kn w_kn Σ_t δᴸ_knt ⊙ R_kn[ids_nt],     R_kn[v] = Σ_s δᴿ_kns[v] h_ns

a gather of δᴿ at the ids, (K, N, S, T), one einsum with h and a scatter-add into the
rows: K·N·T·(S + D) floats, no V × D tensor per example.  Untied (Llama) the two calls
read different tables, E from the lookups and R from the projections, and nothing
crosses.  Several lookups (or projections) are concatenated along the positions first.

With ``curvature="kfac"`` a ReversibleEmbedding called once, as a lookup, has the
Embedding's Kronecker block (A the diagonal of token counts,
:mod:`fastewc.rules.embedding`); a reverse call, or a tied table read both ways, keeps its
diagonal (a tied table's Fisher block is not one Kronecker product).

``keras_hub.layers.PositionEmbedding`` (a table P of sequence_length × D) outputs, for
inputs of shape (N, ..., T, D), the rows p_t = start_index + t broadcast over the batch
(or the rows given by ``positions``).  Example n reads row p_t at position t:

      g_kn(P)[p] = Σ_{positions with row p} δ_kn,      Σ_k Σ_n w_kn g_kn(P)[p]²

For inputs (N, T, D) without ``positions`` the rows of one example are distinct, so the
squares need no per-example scatter: row start_index + t gets Σ_kn w_kn δ_knt².
Otherwise the Embedding machinery above does the per-example scatter.

keras_hub's ``ViTPatchingAndEmbedding`` (ViT's first layer) patches the image with a
Conv2D (kernel = stride = patch size, no activation), flattens the grid to P patches,
prepends a class token c (1 × 1 × D) and adds a position table Q (P + 1 × D) read at
positions 0..P:

    o_n0 = c + Q[0],     o_n(1+p) = conv(x_n)_p + Q[1 + p]

With δ_kn the gradients at o_n (K, N, P + 1, D), the conv's output gradients are δ_kn[1:]
reshaped to its grid (handed to the Conv2D rule, :func:`fastewc.rules.conv.conv_rule`,
whose Kronecker block the layer keeps), and each example reads every row of Q and the
class token once:

    g_kn(c) = δ_kn0,     g_kn(Q)[t] = δ_knt,     Σ_kn w_kn g_kn²  (no per-example scatter)

so one probe, the layer output, serves all three.

keras_hub's RMS normalizations (``RMS_NORMS``: Gemma, Llama, Mistral, Mixtral, Phi-3, Qwen)
get :func:`fastewc.rules.norm.rms_norm_rule`.

The keras_hub rules are registered only when ``import keras_hub`` succeeds; the
ReversibleEmbedding rule whenever Keras has that layer.
"""
import typing
import warnings

import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import (check_channels_last, check_plain, leading_dims, position_pair_square_sum,
                                   static_or_dynamic_shape, use_position_pairs, weighted_square_sum)
from fastewc.rules.conv import conv_rule
from fastewc.rules.embedding import lookup, lookup_kronecker_sums, row_square_sums
from fastewc.rules.norm import rms_norm_rule

_ReversibleEmbedding = getattr(keras.layers, "ReversibleEmbedding", None)


# -- ReversibleEmbedding -----------------------------------------------------------------
# Floats of per-example reverse-use gradients held at once (a chunk of examples, K·V·D each).
EXAMPLE_FLOATS = 2**24


def _forward_lookup(layer, ids):
    # The layer's own forward mode: the lookup, and the padding mask it sets itself.
    return _ReversibleEmbedding.call(layer, ids, reverse=False)


class _Call(typing.NamedTuple):
    """One call of a ReversibleEmbedding: ``read`` the ids (lookup, int32 in [0, V)) or
    the hidden states (reverse, float32) it read, and its probe."""
    reverse: bool
    read: typing.Any
    probe: typing.Any


class _TableSquareSums:
    """The ``sum_sq`` of a ReversibleEmbedding's calls in one forward pass (see the module
    docstring); ``delta`` is one tensor for one call, a tuple (one per call) for several."""

    def __init__(self, layer, calls):
        self.layer, self.calls = layer, tuple(calls)

    def __call__(self, delta, weight):
        layer = self.layer
        deltas = delta if len(self.calls) > 1 else (delta,)
        (k, n), dim, rows = leading_dims(deltas[0]), layer.output_dim, layer.input_dim
        lookups = [(c.read, d) for c, d in zip(self.calls, deltas) if not c.reverse]
        reverses = [(c.read, d) for c, d in zip(self.calls, deltas) if c.reverse]
        if lookups:
            ids = tf.concat([tf.reshape(i, [n, -1]) for i, _ in lookups], 1)
            d_lookup = tf.concat([tf.reshape(d, [k, n, -1, dim]) for _, d in lookups], 2)
            sq_lookup = row_square_sums(ids, d_lookup, weight, rows)
        if reverses:
            h = tf.concat([tf.reshape(r, [n, -1, dim]) for r, _ in reverses], 1)
            d_reverse = tf.concat([tf.reshape(d, [k, n, -1, rows]) for _, d in reverses], 2)
            sq_reverse = reverse_square_sum(h, d_reverse, weight)
        if layer.tie_weights:
            if lookups and reverses:
                cross = _cross_sum(ids, d_lookup, h, d_reverse, weight, rows)
                return [(layer.embeddings, sq_lookup + sq_reverse + 2.0 * cross)]
            return [(layer.embeddings, sq_lookup if lookups else sq_reverse)]
        # Untied: each table is read by one mode only (zero gradient if that mode is unused).
        table, reverse_table = layer.embeddings, layer.reverse_embeddings
        return [(table, sq_lookup if lookups else tf.zeros(table.shape, tf.float32)),
                (reverse_table, tf.transpose(sq_reverse) if reverses
                 else tf.zeros(reverse_table.shape, tf.float32))]


def _rule_output(layer, outputs, calls):
    """One call's RuleOutput, or several calls' merged into one.  A single lookup has the
    Embedding's Kronecker block (:func:`fastewc.rules.embedding.lookup_kronecker_sums`:
    A the diagonal of token counts); a reverse call or several calls (a tied LM head: the
    table's Fisher block is not one Kronecker product) keep the diagonal."""
    probe = calls[0].probe if len(calls) == 1 else tuple(c.probe for c in calls)
    sum_sq = _TableSquareSums(layer, calls)
    kron = None
    if len(calls) == 1 and not calls[0].reverse:
        def kron(delta, weight, mask):
            return [lookup_kronecker_sums(layer, calls[0].read, delta, weight, mask)]
    return RuleOutput(outputs, probe, sum_sq=sum_sq, kron=kron,
                      merge=lambda later: _rule_output(layer, later.outputs, calls + later.sum_sq.calls))


def reversible_embedding_rule(layer, inputs, reverse=False):
    if not reverse:
        outputs, ids = lookup(layer, inputs, _forward_lookup, "ReversibleEmbedding")
        return _rule_output(layer, outputs, (_Call(False, ids, outputs),))
    check_plain(layer, "ReversibleEmbedding")
    kernel = tf.transpose(layer.embeddings) if layer.tie_weights else layer.reverse_embeddings    # (D, V)
    h = inputs
    if layer.reverse_dtype is not None:
        h, kernel = tf.cast(h, layer.reverse_dtype), tf.cast(kernel, layer.reverse_dtype)
    z = keras.ops.matmul(h, kernel)
    outputs = z
    if layer.logit_soft_cap is not None:
        cap = layer.logit_soft_cap
        outputs = keras.ops.multiply(keras.ops.tanh(keras.ops.divide(z, cap)), cap)
    return _rule_output(layer, outputs, (_Call(True, tf.cast(h, tf.float32), z),))


def reverse_square_sum(h, delta, weight):
    """Σ_kn w_kn (Σ_t δ_kntᵀ h_nt)² of shape (V, D), for ``h`` (N, T, D) float32 and
    ``delta`` (K, N, T, V): pairs of positions while they pay, else the per-example
    gradients, at most ``EXAMPLE_FLOATS`` of them at once (a loop over chunks of examples)."""
    positions, (k, n) = h.shape[1], leading_dims(delta)
    if use_position_pairs(positions, delta.shape[0]):
        return tf.transpose(position_pair_square_sum(h, delta, weight))

    def chunk_sum(h_c, delta_c, weight_c):
        return weighted_square_sum(tf.einsum("ntd,kntv->knvd", h_c, delta_c), weight_c)

    size = 1 if not isinstance(k, int) else k * h.shape[-1] * delta.shape[-1]
    if not isinstance(n, int) or n * size <= EXAMPLE_FLOATS:
        return chunk_sum(h, delta, weight)
    c = max([c for c in range(1, n + 1) if n % c == 0 and c * size <= EXAMPLE_FLOATS] or [1])
    # The chunks along a new axis, read with a gather: a `tf.slice` at a loop-dependent
    # start becomes, under XLA, a pad of its operand to twice every dimension (the
    # (K, N, T, V) deltas 2⁴ times over).
    h_chunks = tf.reshape(h, tf.concat([[n // c, c], tf.shape(h)[1:]], 0))
    delta_chunks = tf.reshape(delta, tf.concat([[k, n // c, c], tf.shape(delta)[2:]], 0))
    weight_chunks = tf.reshape(weight, [k, n // c, c])

    def body(i, total):
        return i + 1, total + chunk_sum(tf.gather(h_chunks, i), tf.gather(delta_chunks, i, axis=1),
                                        tf.gather(weight_chunks, i, axis=1))

    total = tf.zeros([delta.shape[-1], h.shape[-1]], tf.float32)
    return tf.while_loop(lambda i, _: i < n // c, body, (tf.constant(0), total))[1]


def _cross_sum(ids, d_lookup, h, d_reverse, weight, rows):
    """Σ_kn w_kn L_kn ⊙ R_kn (V, D) for the lookup gradient L (ids (N, T), δᴸ (K, N, T, D))
    and the reverse one R (h (N, S, D), δᴿ (K, N, S, V)): L is zero off the looked-up rows,
    so R is needed only there, R_kn[ids_nt] = Σ_s δᴿ_kns[ids_nt] h_ns."""
    k, n = leading_dims(d_lookup)
    at_ids = tf.gather(d_reverse, tf.broadcast_to(ids[None], tf.concat([[k], tf.shape(ids)], 0)),
                       axis=3, batch_dims=2)                                    # (K, N, S, T)
    r = tf.einsum("knst,nsd->kntd", at_ids, h)                                  # R_kn[ids_nt]
    c = tf.einsum("kn,kntd->ntd", weight, d_lookup * r)
    return tf.math.unsorted_segment_sum(tf.reshape(c, [-1, h.shape[-1]]), tf.reshape(ids, [-1]), rows)


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


# -- ViTPatchingAndEmbedding -------------------------------------------------------------
def vit_patching_rule(layer, inputs):
    check_plain(layer, "ViTPatchingAndEmbedding")
    check_channels_last(layer, "ViTPatchingAndEmbedding")
    conv = conv_rule(layer.patch_embedding, inputs)
    grid = conv.outputs
    shape = tf.shape(grid)
    patches = tf.reshape(grid, [shape[0], -1, grid.shape[-1]])
    positions = layer.position_embedding(layer.position_ids)
    if layer.use_class_token:
        patches = keras.ops.concatenate([keras.ops.tile(layer.class_token, (shape[0], 1, 1)), patches], axis=1)
    outputs = keras.ops.add(patches, positions)
    first = 1 if layer.use_class_token else 0
    table = layer.position_embedding.embeddings

    def conv_delta(delta):
        return tf.reshape(delta[:, :, first:], list(leading_dims(delta)) + static_or_dynamic_shape(grid)[1:])

    def sum_sq(delta, weight):
        squares = tf.einsum("kn,kntd->td", weight, tf.square(delta))
        pairs = conv.sum_sq(conv_delta(delta), weight) + [(table, squares)]
        if layer.use_class_token:
            pairs.append((layer.class_token, tf.reshape(squares[0], layer.class_token.shape)))
        return pairs

    kron = None
    if conv.kron is not None:
        def kron(delta, weight, mask):
            return conv.kron(conv_delta(delta), weight, mask)

    return RuleOutput(outputs, outputs, sum_sq=sum_sq, kron=kron)


def _vit_patching_class():
    """keras_hub's ViTPatchingAndEmbedding (a private path: None where this keras_hub has none)."""
    try:
        from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding   # noqa: PLC0415
    except ImportError:
        return None
    return ViTPatchingAndEmbedding


def _position_embedding_class():
    import keras_hub   # noqa: PLC0415 -- only reached with keras_hub installed
    return keras_hub.layers.PositionEmbedding


# keras_hub's RMS normalizations (module under keras_hub.src.models, class): each computes
# x · rsqrt(mean(x²) + ε) over the last axis times its ``scale`` (Gemma's times 1 + scale),
# the formula of fastewc.rules.norm.rms_norm_rule.  Private paths: one that is missing (another
# keras_hub version) is skipped.
RMS_NORMS = (("gemma.rms_normalization", "RMSNormalization"),
             ("gemma3.gemma3_layers", "RMSNormalization"),
             ("llama.llama_layernorm", "LlamaLayerNorm"),
             ("mistral.mistral_layer_norm", "MistralLayerNormalization"),
             ("mixtral.mixtral_layer_norm", "MixtralLayerNormalization"),
             ("phi3.phi3_layernorm", "Phi3LayerNorm"),
             ("qwen.qwen_layernorm", "QwenLayerNorm"),
             ("qwen3.qwen3_layernorm", "Qwen3LayerNorm"))


def rms_norm_classes():
    """The keras_hub classes of ``RMS_NORMS`` this keras_hub has."""
    import importlib   # noqa: PLC0415
    found = []
    for module, name in RMS_NORMS:
        try:
            found.append(getattr(importlib.import_module(f"keras_hub.src.models.{module}"), name))
        except (ImportError, AttributeError):
            continue
    return found


def _register():
    if _ReversibleEmbedding is not None:
        # keras_hub's ReversibleEmbedding subclasses it without its own call: it inherits the rule.
        register_rule(_ReversibleEmbedding, reversible_embedding_rule)
    try:
        import keras_hub   # noqa: PLC0415 -- optional dependency
        position_embedding = keras_hub.layers.PositionEmbedding
        rms_norms = rms_norm_classes()
    except ImportError:
        return
    except Exception as err:   # noqa: BLE001 -- a broken keras_hub must not break fastewc
        warnings.warn(f"fastewc: keras_hub is installed but failed to import ({err!r}); its "
                      "layers get no factored Fisher rule.", stacklevel=2)
        return
    register_rule(position_embedding, position_embedding_rule)
    vit_patching = _vit_patching_class()
    if vit_patching is not None:
        register_rule(vit_patching, vit_patching_rule, subclasses=False)
    for cls in rms_norms:
        register_rule(cls, rms_norm_rule, subclasses=False)


_register()
