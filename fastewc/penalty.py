"""The EWC penalty as pure functions: its value, its analytic gradient and the state merges.

Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting
in neural networks", PNAS 114(13)) pulls the weights θ towards the weights θ* of an old
task with a diagonal quadratic weighted by that task's Fisher F:

    penalty(θ) = λ/2 · [ Σ_i F_i (θ_i − θ*_i)² + c ]          (c: a constant, default 0)
    ∂penalty/∂θ_i = λ · F_i · (θ_i − θ*_i)

:func:`ewc_penalty_and_gradients` computes the value and the gradient g in ONE compiled
function over all the variables (value = ½ Σ_i g_i (θ_i − θ*_i) + λc/2, so the value
costs one multiply-add per parameter on top of g; how many loops that function runs is
the compiler's choice: under XLA on CPU the value's reduction and g are two loops).
:func:`ewc_penalty` returns the value with a ``tf.custom_gradient`` whose backward pass
is that g (times the upstream gradient): nothing is re-derived by autodiff and no
activations are kept.  Time and memory are O(P) for P parameters; the compiled function
is traced once per list of shapes and reused.

Overflow: g = λ·(F·d) and the value Σ_i ½ g_i d_i (d = θ − θ*) form no intermediate larger
than their results, so a value and gradients that float32 can hold come out finite, however
large λ·F is.  A value that is not finite (it overflows float32's 3.4e38, or the weights are
NaN) raises, naming the variables (:func:`check_finite`): eagerly a ``FloatingPointError``,
traced an ``InvalidArgumentError`` when the function runs; under XLA (``jit_compile=True``)
TensorFlow drops the check.  The ``inline`` form and :func:`ewc_penalty_gradients` are not
checked: the train steps add their own check (``stop_on_nonfinite``, whose error names
the variable), and without it return the non-finite loss.

Everything is float32 (F, θ* and the result), whatever the model's compute dtype: under
``mixed_float16`` Keras variables are float32 and are read here without the float16
autocast a layer call would apply, since float16 squares underflow.  ``fisher``,
``anchors``, ``lam`` and ``c`` are treated as constants (no gradient flows to them).

Several tasks, one quadratic (the state :class:`fastewc.EWC` keeps):

* ``mode="separate"`` — Kirkpatrick et al.'s multi-task penalty Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)²
  is exactly one quadratic, since a sum of parabolas is a parabola:

      Σ_t F_t (θ − θ_t)² = A (θ − μ)² + Σ_t F_t θ_t² − A μ²,
      A = Σ_t F_t,   μ = Σ_t F_t θ_t / A   (elementwise).

  :func:`merge_separate` adds one task at a time in the cancellation-free form

      A' = A + F,   μ' = μ + (F / A') (θ − μ),   c' = c + Σ_i (A_i F_i / A'_i) (μ_i − θ_i)²

  (the increment of c is a sum of non-negative terms, so nothing cancels).  Where A'_i = 0
  the term vanishes and μ'_i is the latest anchor θ_i (finite).  2 floats per parameter
  (A, μ) plus one scalar c, for any number of tasks: O(P), not O(T·P).

* ``mode="online"`` — Online EWC (Schwarz et al. 2018, "Progress & Compress: A scalable
  framework for continual learning", ICML): :func:`merge_online`,

      F ← γ·F + F_new,   θ* ← θ_new,   c = 0.

Merges run in float64 and return float64; store the result in float32.
:func:`merge_all` applies one of them to every variable of a model, one variable (or
piece of one) at a time (what :meth:`fastewc.EWC.add_task` commits).
"""
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import _policy
from fastewc._checks import as_float32, check_jit_compile, check_lam

__all__ = [
    "ewc_penalty", "ewc_penalty_gradients", "ewc_penalty_and_gradients",
    "merge_separate", "merge_online", "merge_all", "read_float32", "default_jit_compile",
    "quadratic", "explain", "check_finite",
]

_COMPILED = {}   # (kind, jit_compile) -> tf.function, shared by every caller


def default_jit_compile():
    """XLA for the standalone penalty function: on GPU yes, on CPU no
    (:func:`fastewc._policy.default_jit_compile` with no model; figures in the README)."""
    return _policy.default_jit_compile()


# -- reading values ---------------------------------------------------------------------
def read_float32(variable):
    """The float32 value of ``variable`` (Keras variable, tf.Variable or tensor).

    Keras variables are read with autocast disabled, so inside a ``mixed_float16`` layer
    call this is the float32 master weight, not its float16 copy.  Reads are recorded by
    any active ``tf.GradientTape`` as usual.
    """
    if compat.reads_with_autocast(variable):
        with compat.AutocastScope(None):
            value = tf.convert_to_tensor(variable.value)
    else:
        value = tf.convert_to_tensor(variable)
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)


def _name(variable, index):
    return getattr(variable, "path", None) or getattr(variable, "name", None) or f"#{index}"


def _check_aligned(variables, fisher, anchors):
    for label, values in (("variables", variables), ("fisher", fisher), ("anchors", anchors)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"`{label}` must be a list of variables or tensors, one per variable. "
                            f"Received: {label} of type {type(values).__name__}")
    variables, fisher, anchors = list(variables), list(fisher), list(anchors)
    if not len(variables) == len(fisher) == len(anchors):
        raise ValueError(
            "`variables`, `fisher` and `anchors` must be lists of the same length, one entry "
            f"per variable. Received: {len(variables)} variables, {len(fisher)} fisher and "
            f"{len(anchors)} anchors")
    for i, (v, f, a) in enumerate(zip(variables, fisher, anchors)):
        shape = tuple(np.shape(v))
        for label, t in (("fisher", f), ("anchors", a)):
            if tuple(np.shape(t)) != shape:
                raise ValueError(
                    f"`{label}[{i}]` must have the shape of variable '{_name(v, i)}', "
                    f"{shape}. Received: shape {tuple(np.shape(t))}")
    return variables, fisher, anchors


# -- the compiled bodies ----------------------------------------------------------------
def _half_sum(t):
    """½ Σ of every entry, the ½ inside the sum (a total up to float32's largest value is
    representable).  Under XLA, for matrices, a matrix-vector product with a vector of ½
    first: XLA on CPU emits a full reduce_sum as a slow loop of its own, while the matvec
    fuses with the elementwise product (README, train-step figures).  Elsewhere a plain
    reduce_sum: TensorFlow's oneDNN matvec is not deterministic in a graph (its last bit
    varies between calls on the same inputs), Eigen's reduction is."""
    if t.shape.rank is None or t.shape.rank < 2 or not compat.tracing_for_xla():
        return tf.reduce_sum(0.5 * t)
    rows = tf.reshape(t, [-1, t.shape[-1]])
    return tf.reduce_sum(tf.linalg.matvec(rows, tf.fill([t.shape[-1]], tf.constant(0.5, t.dtype))))


def _value_and_grads_body(thetas, fisher, anchors, lam, const):
    """``(value, grads, parts)``, ``parts`` each variable's ½ Σ_i g_i (θ_i − θ*_i) (a vector).

    No intermediate overflows float32 where the result does not: g = λ·(F·d) never forms
    λ·F (a large λ times a large F is Inf, and Inf · 0 a NaN where θ = θ*; :func:`_times_lam`), each term
    g·d = λF d² ≥ 0 is at most the value, and the ½ is applied inside the sums."""
    with tf.name_scope("fastewc/penalty"):  # op names in profiler traces (profiles/)
        grads, parts = [], []
        for theta, f, a in zip(thetas, fisher, anchors):
            part, g = quadratic(theta, f, a, lam)
            grads.append(g)
            parts.append(part)
        # One reduce_sum over the stacked terms: an AddN (or a chain of Adds) of parts that
        # are also returned stacked changed its last bit between calls of one graph.
        value = tf.reduce_sum(tf.stack(parts + [(0.5 * lam) * const]))
        return value, grads, tf.stack(parts)


def quadratic(theta, fisher, anchor, lam):
    """``(½ Σ_i g_i d_i, g)`` with d = θ − θ* and g = λ·(F·d): one variable's share of the
    value (without λ/2 · c) and its gradient, traced inline (float32 tensors in)."""
    d = theta - anchor
    g = _times_lam(fisher * d, lam)
    return _half_sum(g * d), g


def _grads_body(thetas, fisher, anchors, lam):
    with tf.name_scope("fastewc/penalty"):
        return [_times_lam(f * (theta - a), lam) for theta, f, a in zip(thetas, fisher, anchors)]


def _times_lam(fd, lam):
    """λ·(F·d), in that order: a ``MulNoNan``, which Grappler's arithmetic optimizer does not
    regroup with the Mul F·d into (λ·F)·d (it pairs the scalar first, to minimize
    broadcasts).  Same cost as a Mul; 0 where λ = 0."""
    return tf.math.multiply_no_nan(fd, lam)


# -- a penalty that is not finite --------------------------------------------------------
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(value, parts, names, explain=None):
    """``value`` (the penalty), raising if it is not finite, naming the variables whose
    entry of ``parts`` (their share, a vector aligned with ``names``) is not.

    Eagerly: a ``FloatingPointError`` with ``explain(i)`` for each such variable i (the
    diagnosis, computed on the error path only).  Traced (a ``tf.function`` around the
    penalty): a ``tf.debugging.Assert`` that raises ``InvalidArgumentError`` when the
    function runs, with the variables' names; TensorFlow drops it under XLA
    (``jit_compile=True``), where the value comes back as it is -- a fastewc train step's
    ``stop_on_nonfinite=True`` stops there.  Costs one scalar read eagerly, three scalar-sized
    ops traced."""
    names = list(names)
    if tf.executing_eagerly():
        total = float(value)
        if np.isfinite(total):
            return value
        shares = np.asarray(parts, np.float64).reshape(-1)
        bad = [i for i, share in enumerate(shares) if not np.isfinite(share)]
        if bad:
            what = "; ".join(f"variable '{names[i]}'" + (f": {explain(i)}" if explain else "")
                             for i in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        else:
            what = (f"every variable's share is finite (largest {shares.max(initial=0.0):.4g}), but "
                    f"their sum or the constant term λc/2 goes beyond float32's largest value "
                    f"{_FLOAT32_MAX:.4g}")
        raise FloatingPointError(
            f"fastewc: the EWC penalty λ/2 Σ_i A_i (θ_i − μ_i)² is not finite in float32 ({total}): "
            f"{what}. Lower `lam`, or rescale the loss (the Fisher) or the weights; if the weights "
            "are not finite, training diverged before the penalty.")
    # No string op on the data: XLA compiles the Assert away but cannot compile those.
    tf.debugging.Assert(tf.math.is_finite(value), [
        "fastewc: the EWC penalty λ/2 Σ_i A_i (θ_i − μ_i)² is not finite in float32 (lower `lam`, "
        "rescale the loss or the weights, or training diverged before it). Whether each share is "
        f"finite, in the order of {names}:", tf.math.is_finite(parts)], summarize=max(len(names), 1))
    return value


def explain(theta, fisher, anchor, lam):
    """Why one variable's share λ/2 Σ F (θ − θ*)² is not finite, from float64 NumPy."""
    theta, fisher, anchor = (np.asarray(t, np.float64) for t in (theta, fisher, anchor))
    if not np.all(np.isfinite(theta)):
        return "its weights θ are NaN or Inf"
    d = np.abs(theta - anchor)
    share = 0.5 * float(lam) * float(np.sum(fisher * d * d))
    return (f"λ/2 Σ A (θ − μ)² = {share:.4g} goes beyond float32's largest value {_FLOAT32_MAX:.4g} "
            f"(lam={float(lam):.4g}, A up to {fisher.max(initial=0.0):.4g}, |θ − μ| up to "
            f"{d.max(initial=0.0):.4g})")


def compiled(kind, jit_compile=None):
    """The shared ``tf.function`` behind the compiled calls (``kind``: "value_and_grads" or
    "grads"); exposed so tests can check ``experimental_get_tracing_count()``."""
    jit = default_jit_compile() if jit_compile is None else bool(jit_compile)
    fn = _COMPILED.get((kind, jit))
    if fn is None:
        body = {"value_and_grads": _value_and_grads_body, "grads": _grads_body}[kind]
        fn = tf.function(body, jit_compile=jit, autograph=False)
        _COMPILED[(kind, jit)] = fn
    return fn


# -- public functional core -------------------------------------------------------------
def ewc_penalty_and_gradients(variables, fisher, anchors, lam, *, const=0.0, jit_compile=None,
                              inline=False):
    """``(value, grads)`` of the EWC penalty from one compiled function.

        value   = λ/2 · [ Σ_i F_i (θ_i − θ*_i)² + const ]      float32 scalar
        grads_j = λ · F_j · (θ_j − θ*_j)                        float32, one per variable

    ``value`` is differentiable w.r.t. ``variables`` through a ``tf.custom_gradient`` that
    returns ``grads`` (analytic, not autodiff).  Use ``grads`` directly in a train step to
    add the penalty's gradient without taping it.

    Args:
      variables: list of Keras variables, tf.Variables or tensors θ (read as float32).
      fisher: list of F, same shapes (F ≥ 0), treated as constants.
      anchors: list of θ*, same shapes, treated as constants.
      lam: λ, a float or scalar tensor (λ ≥ 0).
      const: c, a scalar added inside the bracket (the separate-mode constant).
      jit_compile: XLA for the compiled function; None: :func:`default_jit_compile`.
      inline: trace the computation into the calling graph (no nested ``tf.function``, no
        ``tf.custom_gradient``: a tape would differentiate ``value`` by plain autodiff,
        and ``jit_compile`` is the caller's).  For compiled train steps that add
        ``grads`` themselves: it saves the nested call and its gradient wrapper.

    Raises (not ``inline``): ``FloatingPointError`` eagerly, ``InvalidArgumentError`` when a
    non-XLA ``tf.function`` runs, if the value is not finite in float32, naming the
    variables whose share is not (:func:`check_finite`).
    """
    check_jit_compile(jit_compile)
    check_lam(lam, allow_tensor=True)
    variables, fisher, anchors = _check_aligned(variables, fisher, anchors)
    lam = as_float32(lam)
    const = as_float32(const)
    if not variables:
        return 0.5 * lam * const, []
    thetas = [read_float32(v) for v in variables]
    fisher = [as_float32(f) for f in fisher]
    anchors = [as_float32(a) for a in anchors]
    if inline:
        return _value_and_grads_body(thetas, fisher, anchors, lam, const)[:2]
    fn = compiled("value_and_grads", jit_compile)
    n = len(thetas)
    out = {}

    # Every tensor the forward pass uses is an argument, so tf.custom_gradient sees no
    # captured variable reads; only the θ arguments get a gradient.
    @tf.custom_gradient
    def penalty_with_analytic_gradient(*flat):
        value, grads, out["parts"] = fn(list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:3 * n]),
                                        flat[3 * n], flat[3 * n + 1])
        out["grads"] = grads

        def grad_fn(upstream):
            return [upstream * g for g in grads] + [None] * (2 * n + 2)

        return value, grad_fn

    value = penalty_with_analytic_gradient(*thetas, *fisher, *anchors, lam, const)
    value = check_finite(value, out["parts"], [_name(v, i) for i, v in enumerate(variables)],
                         lambda i: explain(thetas[i], fisher[i], anchors[i], lam))
    return value, out["grads"]


def ewc_penalty(variables, fisher, anchors, lam, *, const=0.0, jit_compile=None):
    """The EWC penalty λ/2 · [Σ_i F_i (θ_i − θ*_i)² + const], a float32 scalar whose gradient
    w.r.t. ``variables`` is the analytic λ·F·(θ − θ*) (``tf.custom_gradient``).

    Pure: no state; works eagerly, inside ``tf.function`` and under ``jit_compile=True``.
    See :func:`ewc_penalty_and_gradients` for the arguments.
    """
    value, _ = ewc_penalty_and_gradients(variables, fisher, anchors, lam, const=const,
                                         jit_compile=jit_compile)
    return value


def ewc_penalty_gradients(variables, fisher, anchors, lam, *, jit_compile=None):
    """The penalty's gradient λ·F·(θ − θ*) for each variable (list of float32 tensors), in
    one compiled function and without a tape: add it to a train step's gradients."""
    check_jit_compile(jit_compile)
    check_lam(lam, allow_tensor=True)
    variables, fisher, anchors = _check_aligned(variables, fisher, anchors)
    if not variables:
        return []
    return compiled("grads", jit_compile)(
        [read_float32(v) for v in variables], [as_float32(f) for f in fisher],
        [as_float32(a) for a in anchors], as_float32(lam))


# -- merging tasks ----------------------------------------------------------------------
def _f64(x):
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float64)


def merge_separate(fisher_sum, mean, fisher_new, theta_new):
    """Add one task to the separate-mode quadratic (Kirkpatrick et al. 2017).

    Given A = Σ_{t<T} F_t and μ = Σ_{t<T} F_t θ_t / A, and the new task's (F, θ):

        A' = A + F
        μ' = μ + (F / A') (θ − μ)                       (θ where A' = 0 or A = 0)
        Δc = Σ_i A_i F_i / A'_i · (μ_i − θ_i)²          (0 where A'_i = 0)

    so that, for every x, A(x − μ)² + F(x − θ)² = A'(x − μ')² + (per-element share of Δc):
    the separate penalty is exactly λ/2 [Σ_i A'_i (θ_i − μ'_i)² + c + Δc].  Start from
    A = 0 (any finite μ) and c = 0.  Elementwise on one variable; float64 in and out.

    Returns:
      ``(A', μ', Δc)``: float64 tensors of the variable's shape and a float64 scalar.
    """
    a, mu, f, theta = _f64(fisher_sum), _f64(mean), _f64(fisher_new), _f64(theta_new)
    a_new = a + f
    positive = a_new > 0
    safe = tf.where(positive, a_new, tf.ones_like(a_new))
    weight = tf.where(positive, f / safe, tf.ones_like(f))
    mu_new = tf.where(a > 0, mu + weight * (theta - mu), theta)
    delta_c = tf.reduce_sum(tf.where(positive, a * f / safe, tf.zeros_like(a)) * tf.square(mu - theta))
    return a_new, mu_new, delta_c


def merge_online(fisher, anchor, fisher_new, theta_new, gamma):
    """Online EWC (Schwarz et al. 2018): ``(γ·F + F_new, θ_new)``, float64.

    One quadratic whose older tasks decay geometrically by γ ∈ [0, 1]; the anchor is the
    latest task's weights.  Elementwise on one variable.
    """
    del anchor  # the previous anchor is replaced
    return _f64(gamma) * _f64(fisher) + _f64(fisher_new), _f64(theta_new)


# A variable's merge runs on flat pieces of at most this many floats (:func:`merge_all`).
MERGE_PIECE_FLOATS = 2**24


def merge_all(fisher_sums, means, fishers, thetas, online, gamma):
    """Every variable's merge, float64 inside: for each variable j,
    ``merge_online(A_j, μ_j, F_j, θ_j, γ)`` when ``online`` (a Python bool), else
    ``merge_separate(A_j, μ_j, F_j, θ_j)``.  Pure: nothing is assigned.  Eager only.

    Memory: ONE PIECE AT A TIME.  Each variable, or each flat slice of at most
    ``MERGE_PIECE_FLOATS`` floats of a larger one, is merged by its own call of a compiled
    function (:func:`_merge_piece`; traced for a few shapes, ``reduce_retracing``), whose
    float64 temporaries (the four inputs cast, A', μ', the terms of Δc: ~80 bytes per
    float) are gone when it returns; a sliced variable's float32 results are then joined.
    So the merge holds its float32 results (8 bytes per parameter) and one piece's
    temporaries, not every variable's at once: one function over the whole model let the
    executor start every variable's casts together (README, "What consolidate holds at
    its peak").  Not XLA: it runs once per task, and a compile would cost more than the
    elementwise work it speeds up.

    Returns the float32 (A', μ') lists, the separate-mode constant's increment Σ_j Δc_j
    (float64; 0 when online) and, per variable, two flags (bool, shape (n, 2)): [0] the
    merge cannot take its new Fisher -- F has a negative or non-finite value, or the result
    is not finite in float32 (A' = A + F, μ' or the variable's share Δc_j overflows float32's
    range, 3.4e38, although F and θ are finite); [1] its anchor θ has a non-finite value.
    The caller (:meth:`fastewc.EWC.add_task`) refuses a flagged merge, so the stored state
    is always finite.  Whether the total c + Σ_j Δc_j fits float32 is the caller's check (it
    holds c).
    """
    a_out, mu_out, bad, dc = [], [], [], tf.constant(0.0, tf.float64)
    gamma = tf.convert_to_tensor(gamma, tf.float64)
    for a, mu, f, theta in zip(fisher_sums, means, fishers, thetas):
        size = a.shape.num_elements()
        if size <= MERGE_PIECE_FLOATS:
            a_new, mu_new, dc_j, bad_j = _merge_piece(a, mu, f, theta, online, gamma)
        else:
            parts = []
            for lo in range(0, size, MERGE_PIECE_FLOATS):
                piece = [tf.reshape(t, [-1])[lo:lo + MERGE_PIECE_FLOATS] for t in (a, mu, f, theta)]
                parts.append(_merge_piece(*piece, online, gamma))
            a_new, mu_new = (tf.reshape(tf.concat([p[i] for p in parts], 0), a.shape) for i in (0, 1))
            dc_j = tf.add_n([p[2] for p in parts])
            bad_j = tf.reduce_any(tf.stack([p[3] for p in parts]), 0)
            del parts
        a_out.append(a_new)
        mu_out.append(mu_new)
        dc += dc_j
        bad.append(bad_j)
    return a_out, mu_out, dc, tf.stack(bad) if bad else tf.zeros([0, 2], tf.bool)


@tf.function(autograph=False, jit_compile=False, reduce_retracing=True)
def _merge_piece(a, mu, f, theta, online, gamma):
    """One piece's merge (:func:`merge_all`): float32 (A', μ'), float64 Δc and its two flags."""
    max32 = tf.constant(np.finfo(np.float32).max, tf.float64)

    def overflows(t):                      # not finite once stored as float32
        return tf.reduce_any(tf.logical_not(tf.abs(t) <= max32))

    if online:
        a_new, mu_new = merge_online(a, mu, f, theta, gamma)
        dc = tf.constant(0.0, tf.float64)
    else:
        a_new, mu_new, dc = merge_separate(a, mu, f, theta)
    bad_f = tf.reduce_any(tf.logical_not(tf.math.is_finite(f)) | (f < 0))
    bad_theta = tf.reduce_any(tf.logical_not(tf.math.is_finite(theta)))
    bad = tf.stack([bad_f | (tf.logical_not(bad_theta) & (overflows(a_new) | overflows(mu_new) | overflows(dc))),
                    bad_theta])
    return tf.cast(a_new, tf.float32), tf.cast(mu_new, tf.float32), dc, bad
