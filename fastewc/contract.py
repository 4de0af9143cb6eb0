"""The factored rules' contract: what a rule returns (:class:`RuleOutput`, with the
Kronecker blocks it may supply as :class:`KroneckerSums`), the error it raises for a
layer it cannot take, and the weighted square sum every rule's per-example gradients end
in.  A leaf module: the registry (:mod:`fastewc.registry`, which re-exports these names),
the rules and the engines import it, and it imports none of them.

Rule contract::

    rule(layer, inputs, *args, **kwargs) -> RuleOutput(outputs, probe, per_example=..., sum_sq=...)

* It replaces ``layer.call(inputs, *args, **kwargs)`` during the Fisher's forward pass and
  must return the same ``outputs``.
* ``probe`` is the tensor (leading dim N = examples) whose output gradients δ determine the
  weight gradients, usually the pre-activation z.  The engine back-propagates K cotangents
  per example to it at once and hands the rule ``delta``, float32 of shape
  (K, N, *probe.shape[1:]).
* ``per_example(delta)`` (the generic contract, BackPACK's base-class pattern) returns a
  list of ``(variable, g)`` pairs, one per trainable variable of the layer, with ``g`` of
  shape (K, N, *variable.shape): example n's gradient for cotangent k.  The engine forms
  Σ_k Σ_n w_kn · g_kn² itself.  Compute it in float32 (cast ``inputs`` first: float16
  squares underflow).
* ``sum_sq(delta, weight)`` (the optional fast override) receives ``weight`` float32 (K, N)
  as well and returns ``(variable, Σ_k Σ_n weight[k, n] · g_kn²)`` pairs directly, for
  rules that never need to hold K·N·|θ| floats (a Dense layer: one matmul of squares).
  When both are given the engine uses ``sum_sq``.  (The factored engine folds √weight
  into the cotangents and passes weights that are statically 1, :func:`unit_weights`;
  a rule still weighs by what it receives.)
* ``kron(delta, weight, mask)`` (optional: Kronecker-factored curvature, see
  :mod:`fastewc.curvature`) receives ``mask`` float32 (N,) as well (1 for an example, 0
  for a padding row) and returns a list of :class:`KroneckerSums`, one per block of the
  layer's weights that has a Kronecker form (a Dense or convolution kernel with its bias);
  the layer's other variables, if any, still come from ``sum_sq`` / ``per_example``.  A
  rule returns ``kron=None`` for a configuration without a Kronecker form (a grouped
  convolution): the layer then keeps its diagonal.  A plain 3-tuple
  ``(outputs, probe, sum_sq)`` is read as ``RuleOutput(outputs, probe, sum_sq=sum_sq)``.
* ``merge(later)`` (optional: a layer called more than once in one forward pass, such as a
  tied language-model head that embeds tokens and projects onto the same table) receives
  the RuleOutput the same rule returned for the layer's later call and returns the
  RuleOutput of both calls: its ``probe`` a tuple (or other nest) of the calls' probes,
  its ``sum_sq`` / ``per_example`` given ``delta`` as the same nest of deltas, and each
  example's gradient is the SUM of the calls' gradients, taken before squaring.  Without
  ``merge`` a second call raises :class:`fastewc.capture.SharedLayerError`.
"""
import typing

import numpy as np
import tensorflow as tf


class UnsupportedLayerError(ValueError):
    """A layer the factored engine cannot take: no rule, a shared layer, or a
    configuration its rule does not cover.  ``method="auto"`` steps down to vmap on it."""


class KroneckerSums(typing.NamedTuple):
    """One Kronecker block of a layer, summed over the rows of a batch (the engine divides
    by the examples seen).  For input rows ā_nl = [a_nl, 1] (the 1 only with a bias) at the
    L positions l of example n (L = 1 for a plain Dense layer) and deltas δ_knl:

        a = Σ_n mask_n · (1/L) Σ_l ā_nl ā_nlᵀ              (d', d')
        g = Σ_k Σ_n weight_kn Σ_l δ_knl δ_knlᵀ             (u, u)

    (the "expand" convention of Eschenhagen et al. 2023, KFC's for convolutions: positions
    are treated as examples).  ``variables`` is (kernel, bias) or (kernel,): the block's
    weight matrix is the kernel reshaped to (d, u) with the bias as its last row
    (:func:`fastewc.kronecker.weight_matrix`), d the product of the kernel's first
    ``input_rank`` axes (the inputs a row holds) and u that of the others (the outputs a
    delta holds).  ``input_rank`` None means all axes but the last (a Dense or convolution
    kernel); an EinsumDense kernel such as MultiHeadAttention's query (d_model, heads,
    head_dim) has input_rank 1, u = heads·head_dim, and its bias (heads, head_dim) is the
    last row.

    ``rows`` (N, L, d') and ``deltas`` (K, N, L, u) are the per-example rows these sums
    come from: the input rows ā_nl (with the bias's 1, zero for a padding row) and the
    deltas, so that example n's gradient of the block for cotangent k is
    ḡ_kn = Σ_l ā_nl δ_knlᵀ (a kind's second pass reads them; a pass that does not read
    them does not compute them: the graph prunes them).  None: the rule does not give
    them."""
    variables: tuple
    a: typing.Any
    g: typing.Any
    input_rank: typing.Optional[int] = None
    rows: typing.Any = None
    deltas: typing.Any = None


class RuleOutput(typing.NamedTuple):
    """What a rule returns (see the module docstring)."""
    outputs: typing.Any
    probe: typing.Any
    per_example: typing.Optional[typing.Callable] = None
    sum_sq: typing.Optional[typing.Callable] = None
    kron: typing.Optional[typing.Callable] = None
    merge: typing.Optional[typing.Callable] = None

    def square_sums(self, delta, weight):
        """``[(variable, Σ_k Σ_n weight[k, n] · g_kn²)]``: the fast override if the rule
        has one, else the generic weighted square sum of its per-example gradients."""
        if self.sum_sq is not None:
            return self.sum_sq(delta, weight)
        return [(variable, weighted_square_sum(g, weight)) for variable, g in self.per_example(delta)]


def as_rule_output(result, layer):
    """A rule's return value as a :class:`RuleOutput` (legacy 3-tuples accepted)."""
    if isinstance(result, RuleOutput):
        out = result
    elif isinstance(result, tuple) and len(result) == 3:
        out = RuleOutput(result[0], result[1], sum_sq=result[2])
    else:
        raise TypeError(f"The factored rule of layer '{layer.name}' ({type(layer).__name__}) must return "
                        f"a fastewc.RuleOutput. Received: {type(result).__name__}")
    if out.per_example is None and out.sum_sq is None:
        raise TypeError(f"The factored rule of layer '{layer.name}' ({type(layer).__name__}) returned "
                        "a RuleOutput with neither `per_example` nor `sum_sq`.")
    return out


# -- the contraction every rule's per-example gradients end in
def weighted_square_sum(g, weight):
    """Σ_k Σ_n weight[k, n] · g[k, n]² for ``g`` of shape (K, N, *shape): shape ``shape``."""
    return weighted_rows(weight, tf.square(tf.cast(g, tf.float32)), 2)


def weighted_rows(weight, t, lead=1):
    """Σ_r weight_r t_r over the ``lead`` leading axes of ``t`` (weight of those axes'
    shape): one (1 × R)(R × S) matmul.  Fewer graph ops than ``tf.tensordot`` (whose
    reshapes and shape arithmetic are most of a rule's trace time on a deep model)."""
    tail = static_or_dynamic_shape(t)[lead:]
    size = t.shape[lead:].num_elements()
    flat = tf.reshape(t, [-1, size if size is not None else tf.reduce_prod(tf.shape(t)[lead:])])
    return tf.reshape(tf.matmul(tf.reshape(weight, [1, -1]), flat), tail)


def unit_weights(weight):
    """Whether the cotangents' ``weight`` (K, N) is statically all 1, as the factored
    engine's is (it folds √w into the cotangents,
    :func:`fastewc.engines.base.folded_weights`): a sum Σ_kn w_kn q(δ_kn) then needs no
    pass that weighs the deltas."""
    value = tf.get_static_value(weight)
    return value is not None and bool(np.all(value == 1.0))


def few_rows(rows):
    """Whether ``rows`` (N, L, d') are statically at most d' rows, so fewer floats than the
    d'² factor they form: then :func:`row_gram` forms it, its scales folded into the rows
    (the reference CNN's Dense(9216 → 128): 256 rows, an 85M-float A)."""
    count = rows.shape[:-1].num_elements()
    return count is not None and count <= rows.shape[-1]


def row_gram(rows, scale=None):
    """Σ_n (1/L) Σ_l ā_nl ā_nlᵀ (times ``scale``, a float32 scalar, when given) of ``rows``
    (N, L, d') with a static L: :class:`KroneckerSums`'s ``a`` from its ``rows``.  One
    Gram product (:func:`gram`) of the (N·L × d') rows with the 1/L and the scale folded
    into them as √(scale / L): no pass over the d'² result, the cheaper form where the rows
    are fewer floats than it (a Dense layer with many inputs)."""
    positions, d = rows.shape[1], rows.shape[-1]
    factor = 1.0 / positions if scale is None else scale / positions
    flat = tf.reshape(rows, [-1, d])
    if scale is not None or positions != 1:
        flat = flat * tf.sqrt(tf.cast(factor, flat.dtype))
    return gram(flat)


# -- XᵀX, the Kronecker factors' product, by its symmetry where that pays
# Where the upper blocks beat one matmul, from side-by-side runs (README, "A by its
# symmetry"; `python -m benchmarks.sym_gram`): they lost where the matmul is small (512 × 256,
# 4096 × 257: the extra ops), where A is large (256 × 9217: assembling its 85M floats cost
# as much as the matmul) and where X is large (147456 × 288: its column copies).
SYMMETRIC_MIN_WIDTH = 256          # d below this: one matmul
SYMMETRIC_MIN_MACS = 6 * 10**8     # rows · d² below this: one matmul (512 × 785 was even)
SYMMETRIC_MAX_FACTOR = 2**22       # d² above this (16 MiB of A): one matmul
SYMMETRIC_MAX_ROWS = 2**23         # rows · d above this (32 MiB of X, copied once): one matmul


def gram_blocks(rows, d):
    """How many column blocks :func:`gram` splits an (rows × d) X into: 1 (one matmul) or
    the b of :func:`symmetric_gram` (2 below d = 512, else 3), by the limits above;
    ``rows`` None (not static): 1."""
    if (rows is None or d is None or d < SYMMETRIC_MIN_WIDTH or d * d > SYMMETRIC_MAX_FACTOR
            or rows * d > SYMMETRIC_MAX_ROWS or rows * d * d < SYMMETRIC_MIN_MACS):
        return 1
    return 2 if d < 512 else 3


def gram(x):
    """XᵀX of a float (rows, d) ``x``: (d, d), the Kronecker factors' product.  One matmul
    (:func:`plain_gram`, the reference twin), or where :func:`gram_blocks` says the upper
    blocks pay, :func:`symmetric_gram` (67–75 % of the multiply-adds).  Either is
    symmetric up to the rounding of its matmuls."""
    blocks = gram_blocks(x.shape[0], x.shape[-1])
    return plain_gram(x) if blocks == 1 else symmetric_gram(x, blocks)


def plain_gram(x):
    """XᵀX by one matmul: every entry of the symmetric result computed (rows · d²
    multiply-adds)."""
    return tf.matmul(x, x, transpose_a=True)


def symmetric_gram(x, blocks):
    """XᵀX of ``x`` (R, d) (static d) from its upper blocks.  X's columns split into
    ``blocks`` = b spans X_1 … X_b (widths differing by at most 1; one copy of X), only
    the blocks

        A_ij = X_iᵀ X_j,  i ≤ j,      A_ji = A_ijᵀ

    are products, b(b + 1)/2 matmuls doing (b + 1)/(2b) of the R·d² multiply-adds (b = 2:
    75 %, b = 3: 67 %); the lower blocks are their transposes and A is assembled by one
    concat per block row and one of the rows (about two more writes of A).  The
    off-diagonal blocks mirror each other exactly; a diagonal block A_ii is one matmul's,
    symmetric up to its rounding."""
    d = x.shape[-1]
    edges = [i * d // blocks for i in range(blocks + 1)]
    columns = tf.split(x, [hi - lo for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    return from_upper_blocks({(i, j): tf.matmul(columns[i], columns[j], transpose_a=True)
                              for i in range(blocks) for j in range(i, blocks)}, blocks)


def from_upper_blocks(upper, blocks):
    """The symmetric matrix whose blocks A_ij, i ≤ j < ``blocks``, are ``upper[(i, j)]``:
    A_ji = A_ijᵀ, one concat per block row and one of the rows."""
    block_rows = []
    for i in range(blocks):
        left = [tf.transpose(upper[(j, i)]) for j in range(i)]
        block_rows.append(tf.concat(left + [upper[(i, j)] for j in range(i, blocks)], 1))
    return tf.concat(block_rows, 0)


def static_or_dynamic_shape(t):
    """``t``'s shape as a list: Python ints where static, scalar tensors elsewhere."""
    static = t.shape.as_list()
    if all(d is not None for d in static):
        return static
    dynamic = tf.shape(t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(static)]
