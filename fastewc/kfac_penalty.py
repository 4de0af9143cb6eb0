"""The Kronecker-factored EWC penalty as pure functions: its value, its analytic gradient
and the merge of a task into a block's terms.

For a block (a Dense or convolution kernel with its bias, or an Embedding table whose A is
diagonal and stored as its diagonal, :mod:`fastewc.curvature`) with
weight matrix W̄(θ) (:func:`fastewc.kronecker.weight_matrix`) an EWC keeps terms
(c_t, A_t, G_t, W̄_t) and the penalty is

    P(θ) = λ/2 Σ_blocks Σ_t c_t · vec(W̄ − W̄_t)ᵀ (A_t,δ ⊗ G_t,δ) vec(W̄ − W̄_t)
         = λ/2 Σ_blocks Σ_t c_t Σ (W̄ − W̄_t) ⊙ (A_t,δ (W̄ − W̄_t) G_t,δ),
    ∇_W̄ P = λ Σ_t c_t A_t,δ (W̄ − W̄_t) G_t,δ

(Ritter, Botev & Barber 2018, "Online Structured Laplace Approximations for Overcoming
Catastrophic Forgetting", NeurIPS: the Laplace precision of each layer as a Kronecker
product).  A_δ, G_δ are the factors with factored Tikhonov damping δ
(:func:`fastewc.kronecker.damped_factors`, Martens & Grosse 2015 §6.3): δ = 0 is the
Kronecker-factored Fisher itself; nothing is inverted, so singular factors are fine.
Cost per term: two matmuls, O(d'²u + d'u²), no (d'u)² block; the gradient comes with the
value (``tf.custom_gradient``), not from autodiff.

How a task enters a block's terms (:func:`merge_block`; a sum of Kronecker products is
not a Kronecker product):

* ``mode="separate"``: a new term (1, A, G, W̄_task) per task: Kirkpatrick et al.'s sum of
  per-task penalties, exactly; T tasks cost T terms (memory d'² + u² + d'u floats each).
* ``mode="online"``, ``kfac_sum="exact"``: a new term, every older coefficient multiplied
  by γ, every anchor the latest weights: precision Σ_t γ^(T−t) A_t ⊗ G_t at the latest
  anchor (Schwarz et al. 2018's online EWC with Kronecker blocks), exactly; T terms.
* ``mode="online"``, ``kfac_sum="nearest"``: ONE term, the Kronecker product nearest in
  Frobenius norm to γ A ⊗ G + A_new ⊗ G_new (Van Loan & Pitsianis 1993,
  :func:`fastewc.kronecker.nearest_kronecker`): O(1) memory and cost whatever the tasks;
  its relative error is returned by the merge.
"""
import tensorflow as tf

from fastewc import _policy, kronecker
from fastewc import penalty as penalty_lib
from fastewc._checks import as_float32

KFAC_SUMS = ("exact", "nearest")


class Term:
    """A term's values (float32 tensors or variables): coefficient c, A, G, anchor W̄*."""
    __slots__ = ("coef", "a", "g", "anchor")

    def __init__(self, coef, a, g, anchor):
        self.coef, self.a, self.g, self.anchor = coef, a, g, anchor

    def values(self):
        return (self.coef, self.a, self.g, self.anchor)


def _body(blocks, lam, damping):
    """(value, grads, parts) for ``blocks`` = [(thetas, [(c, A, G, W̄*)])], traced inline;
    ``parts`` each block's share of the value (a vector)."""
    with tf.name_scope("fastewc/kfac_penalty"):
        value, grads, parts = tf.constant(0.0), [], []
        for thetas, terms in blocks:
            part, block_grads = block_penalty(thetas, terms, lam, damping)
            parts.append(part)
            value += part
            grads += block_grads
        return value, grads, tf.stack(parts)


def block_penalty(thetas, terms, lam, damping):
    """``(λ/2 Σ_t c_t ⟨W̄ − W̄_t, A_t,δ (W̄ − W̄_t) G_t,δ⟩, [∇ per theta])`` of one block,
    traced inline: ``thetas`` its current [kernel] or [kernel, bias] (float32 tensors),
    ``terms`` its (c, A, G, W̄*) float32 tensors; the anchors' shape says how the kernel
    is split into W̄'s rows and columns (:func:`fastewc.kronecker.input_rank_of`)."""
    input_rank = kronecker.input_rank_of(thetas[0].shape, terms[0][3].shape[0] - len(thetas) + 1)
    w = kronecker.weight_matrix(thetas, input_rank)
    q_sum, m_sum = tf.constant(0.0), None
    for coef, a, g, anchor in terms:
        a_d, g_d = kronecker.damped_factors(a, g, damping)
        q, m = kronecker.quadratic_form(w - anchor, a_d, g_d)
        q_sum += coef * q
        m_sum = coef * m if m_sum is None else m_sum + coef * m
    return (0.5 * lam) * q_sum, kronecker.split_matrix(lam * m_sum, [tuple(t.shape) for t in thetas],
                                                       input_rank)


_COMPILED = {}


def _compiled(jit_compile):
    """The shared compiled body (every input an argument, so one trace per structure of
    shapes); ``jit_compile`` None: :func:`fastewc._policy.default_jit_compile` with no model
    (XLA on GPU, not on CPU, as the diagonal's standalone penalty)."""
    jit_compile = _policy.default_jit_compile() if jit_compile is None else bool(jit_compile)
    fn = _COMPILED.get(jit_compile)
    if fn is None:
        fn = _COMPILED[jit_compile] = tf.function(_body, jit_compile=jit_compile, autograph=False)
    return fn


def kfac_penalty_and_gradients(blocks, lam, damping=0.0, *, inline=False, jit_compile=None,
                               names=None):
    """``(value, grads)`` of the Kronecker-factored penalty (module docstring).

    Args:
      blocks: ``[(thetas, terms)]``: ``thetas`` the block's current [kernel] or [kernel,
        bias] (float32 tensors; read variables first), ``terms`` a list of
        (c, A, G, W̄*) float32 tensors or variables.  The anchors' shape (d', u) says how
        the kernel is split into W̄'s rows and columns (:func:`fastewc.kronecker.input_rank_of`:
        all axes but the last, or an EinsumDense kernel's input axes).
      lam: λ, a float or scalar float32 tensor.
      damping: δ ≥ 0, a float or scalar float32 tensor.
      inline: trace into the caller's graph without a custom gradient (train steps that
        add ``grads`` themselves); else one compiled function whose value's gradient is
        ``grads`` (``tf.custom_gradient``).
      jit_compile: XLA for that compiled function; None: XLA on GPU only.
      names: a name per block for the error below (default "block 0", "block 1", ...).

    Returns the float32 value and one gradient per theta, blocks in order.  Not inline, a
    value that is not finite raises, naming the blocks whose share is not
    (:func:`fastewc.penalty.check_finite`: eagerly, or when a non-XLA ``tf.function`` runs).
    """
    lam, damping = as_float32(lam), as_float32(damping)
    if not blocks:
        return tf.constant(0.0), []
    if inline:
        return _body(blocks, lam, damping)[:2]
    thetas = [t for block_thetas, _ in blocks for t in block_thetas]
    n = len(thetas)
    structure = [(len(block_thetas), len(terms)) for block_thetas, terms in blocks]
    constants = [tf.convert_to_tensor(v) for _, terms in blocks for term in terms for v in term]
    fn = _compiled(jit_compile)
    out = {}

    def rebuild(flat):
        blocks_, i, j = [], 0, n
        for num_thetas, num_terms in structure:
            terms = [tuple(flat[j + 4 * k: j + 4 * k + 4]) for k in range(num_terms)]
            blocks_.append((list(flat[i:i + num_thetas]), terms))
            i, j = i + num_thetas, j + 4 * num_terms
        return blocks_

    @tf.custom_gradient
    def penalty_with_analytic_gradient(*flat):
        value, grads, out["parts"] = fn(rebuild(flat), flat[-2], flat[-1])
        out["grads"] = grads

        def grad_fn(upstream):
            return [upstream * g for g in grads] + [None] * (len(flat) - n)

        return value, grad_fn

    value = penalty_with_analytic_gradient(*thetas, *constants, lam, damping)
    names = [f"block {i}" for i in range(len(blocks))] if names is None else list(names)
    value = penalty_lib.check_finite(value, out["parts"], names, lambda i: explain(blocks[i][0], lam))
    return value, out["grads"]


def explain(thetas, lam):
    """Why a block's share is not finite (its weights, or the quadratic's size)."""
    if not all(bool(tf.reduce_all(tf.math.is_finite(t))) for t in thetas):
        return "its weights θ are NaN or Inf"
    return (f"its Kronecker quadratic λ/2 Σ_t c_t vec(ΔW̄)ᵀ(A_t ⊗ G_t)vec(ΔW̄) goes beyond float32's "
            f"largest value (lam={float(lam):.4g})")


# -- merging a task -----------------------------------------------------------------------
def merge_block(terms, new, *, mode, kfac_sum, gamma):
    """A block's terms after a task (pure: tensors, nothing assigned).

    Args:
      terms: the block's current :class:`Term` list (values read).
      new: ``(A, G, W̄)`` of the task (float32); a task without factors for the block
        (its variables frozen) goes through :func:`decay_block` instead.
      mode, kfac_sum, gamma: as :class:`fastewc.EWC`.

    Returns ``(terms, relative_error)``: the new :class:`Term` list (float32) and, for
    ``kfac_sum="nearest"``, the Frobenius error of the merge (else 0).
    """
    a_new, g_new, anchor = new
    error = tf.constant(0.0, tf.float64)
    if mode == "separate":
        return list(terms) + [Term(tf.constant(1.0), a_new, g_new, anchor)], error
    gamma32 = tf.constant(gamma, tf.float32)
    if kfac_sum == "exact" or not terms:
        decayed = [Term(gamma32 * t.coef, t.a, t.g, anchor) for t in terms]
        return decayed + [Term(tf.constant(1.0), a_new, g_new, anchor)], error
    (old,) = terms
    a, g, error = kronecker.nearest_kronecker([gamma * old.coef, 1.0], [old.a, a_new], [old.g, g_new])
    return [Term(tf.constant(1.0), tf.cast(a, tf.float32), tf.cast(g, tf.float32), anchor)], error


def decay_block(terms, anchor, *, mode, gamma):
    """A block's terms after a task that has no factors for it (its variables frozen):
    separate mode keeps them; online mode decays every coefficient by γ and moves every
    anchor to the current weights (as the diagonal online EWC does with F = 0)."""
    if mode == "separate":
        return list(terms)
    return [Term(tf.constant(gamma, tf.float32) * t.coef, t.a, t.g, anchor) for t in terms]
