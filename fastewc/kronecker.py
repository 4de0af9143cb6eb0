"""Kronecker-factored (KFAC) EWC curvature as pure functions: layout, quadratic, damping, merge.

KFAC (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored
approximate curvature", ICML; Grosse & Martens 2016, "A Kronecker-factored approximate
Fisher matrix for convolution layers" (KFC), ICML) approximates a layer's Fisher block by a
Kronecker product A ⊗ G of an input-side factor A and an output-gradient factor G.  Ritter,
Botev & Barber 2018 ("Online Structured Laplace Approximations for Overcoming Catastrophic
Forgetting", NeurIPS) use that block as the EWC / Laplace precision instead of its diagonal.

Conventions (every function here and every caller relies on them):

* Block.  A layer with a kernel of shape (..., u) and an optional bias of shape (u,) is one
  block.  Its weight matrix W̄ has shape (d', u): the kernel reshaped to (-1, u) in
  row-major (C) order, with the bias appended as the LAST row when present, so
  d' = prod(kernel.shape[:-1]) (+ 1 with a bias).  :func:`weight_matrix` builds it,
  :func:`split_matrix` undoes it.  A kernel with several output axes (an EinsumDense's:
  MultiHeadAttention's query kernel (d_model, heads, head_dim)) has an ``input_rank``, the
  number of its leading axes that are inputs: W̄ is the kernel reshaped to
  (prod(shape[:input_rank]), prod(shape[input_rank:])) (+ the bias, of shape
  shape[input_rank:], as the last row); None means input_rank = rank − 1
  (:func:`matrix_shape`, :func:`input_rank_of`).
* Factors.  A (d', d') and G (u, u), symmetric positive semi-definite, float32 (float64
  accepted).  A diagonal A may be given as its diagonal, a vector a of shape (d',), and
  then means diag(a) everywhere (an Embedding's A is the diagonal of its token counts: a
  vocabulary of 50 257 rows takes 50 257 floats, not 50 257²); every function here takes
  either form and returns A in the form it received.  vec is the row-major flatten (``np.reshape(W̄, -1)``:
  vec(W̄)[i·u + j] = W̄[i, j]); in that order the Fisher block of vec(W̄) is approximated by
  A ⊗ G exactly as ``np.kron(A, G)`` writes it: (A ⊗ G)[(i, j), (k, l)] = A[i, k] · G[j, l].
* Quadratic.  For Δ = W̄ − W̄* of shape (d', u):

      vec(Δ)ᵀ (A ⊗ G) vec(Δ) = Σ_ij Δ_ij (A Δ G)_ij = Σ Δ ⊙ (A Δ G),
      ∂/∂Δ [vec(Δ)ᵀ (A ⊗ G) vec(Δ)] = 2 A Δ G                   (A, G symmetric),

  so the EWC penalty λ/2 · vec(Δ)ᵀ (A ⊗ G) vec(Δ) and its gradient λ A Δ G cost two
  matrix products, O(d'²u + d'u²), and never form the (d'u × d'u) block.
  :func:`quadratic_form` computes both (a diagonal A: A Δ G = a ⊙ (Δ G), row by row).
* Damping.  Factored Tikhonov damping with the π correction (Martens & Grosse 2015, §6.3):
  A + π√δ I and G + √δ/π I with π² = (tr(A)/d') / (tr(G)/u).  :func:`damped_factors`.
  A diagonal A is damped as the matrix diag(a) is: a + π√δ, tr(A) = Σ a.
* Merging tasks.  A sum of Kronecker products Σ_t c_t A_t ⊗ G_t is not one Kronecker
  product; :func:`nearest_kronecker` returns the nearest one in Frobenius norm (Van Loan &
  Pitsianis 1993, "Approximation with Kronecker products", in Linear Algebra for Large
  Scale and Real-Time Applications, Kluwer) from T × T Gram matrices, without forming any
  Kronecker product.

Everything is TensorFlow and traceable inside ``tf.function`` (also with
``jit_compile=True``): no Python branching on tensor values, no host syncs.  Only static
facts (list lengths, static shapes) are checked in Python.
"""
import numbers

import numpy as np
import tensorflow as tf

from fastewc.penalty import read_float32

__all__ = ["weight_matrix", "split_matrix", "matrix_shape", "input_rank_of", "quadratic_form",
           "damped_factors", "nearest_kronecker"]


# -- dtypes and shapes ------------------------------------------------------------------
def _as_float(value, dtype=None):
    """``value`` as a tensor of ``dtype``; with None, float64 stays float64 and anything
    else becomes float32 (no copy when it already has the target dtype).  Python numbers
    are converted straight to ``dtype`` (no float32 rounding on the way to float64)."""
    if dtype is not None and isinstance(value, numbers.Real):
        return tf.constant(value, dtype)
    value = tf.convert_to_tensor(value)
    if dtype is None:
        dtype = tf.float64 if value.dtype == tf.float64 else tf.float32
    return value if value.dtype == dtype else tf.cast(value, dtype)


def _common_dtype(*tensors):
    """float64 when every tensor is float64, float32 otherwise."""
    return tf.float64 if all(t.dtype == tf.float64 for t in tensors) else tf.float32


def _dim(t, axis):
    """Size of ``t`` along ``axis``: a Python int when static, a scalar tensor otherwise."""
    size = t.shape[axis]
    return size if size is not None else tf.shape(t)[axis]


def _trace(a):
    """tr(A) of a matrix A or of diag(a) for a vector a."""
    return tf.reduce_sum(a) if a.shape.rank == 1 else tf.linalg.trace(a)


def _add_to_diagonal(a, shift):
    """A + shift·I of a matrix A, or a + shift for a diagonal A given as its vector a."""
    return a + shift if a.shape.rank == 1 else tf.linalg.set_diag(a, tf.linalg.diag_part(a) + shift)


def diagonal_of(a):
    """The diagonal of A: A itself when it is given as its diagonal (a vector)."""
    a = tf.convert_to_tensor(a)
    return a if a.shape.rank == 1 else tf.linalg.diag_part(a)


# -- layout ----------------------------------------------------------------------------
def _check_values(values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) not in (1, 2):
        received = (f"{len(values)} tensors" if hasattr(values, "__len__")
                    else f"values of type {type(values).__name__}")
        raise ValueError("`values` must be a list [kernel] or [kernel, bias] (the kernel of "
                         f"shape (..., u), the bias of shape (u,)). Received: {received}")
    return list(values)


def matrix_shape(kernel_shape, input_rank=None):
    """``(d, u)`` of the kernel part of a block's weight matrix: the products of the
    kernel's first ``input_rank`` axes and of the others (None: all but the last).  Python
    ints from a fully defined ``kernel_shape``; ValueError for an input_rank outside
    [1, rank − 1] (a rank-1 kernel: input_rank None, d = 1)."""
    dims = [int(d) for d in kernel_shape]
    rank = len(dims) - 1 if input_rank is None else input_rank
    if input_rank is not None and (isinstance(input_rank, bool) or not 1 <= input_rank < len(dims)):
        raise ValueError(f"`input_rank` must be None or in [1, {len(dims) - 1}] for a kernel of shape "
                         f"{tuple(dims)}. Received: input_rank={input_rank!r}")
    return int(np.prod(dims[:rank], dtype=np.int64)), int(np.prod(dims[rank:], dtype=np.int64))


def input_rank_of(kernel_shape, rows):
    """The ``input_rank`` whose weight matrix has ``rows`` kernel rows (a stored W̄* or A
    says which split it was made with), None when that is the default (all axes but the
    last) or when no split has that many rows.  Splits that differ only by axes of size 1
    give the same matrix; the first is returned."""
    dims = [int(d) for d in kernel_shape]
    for rank in range(1, len(dims) - 1):
        if int(np.prod(dims[:rank], dtype=np.int64)) == rows:
            return rank
    return None


def weight_matrix(values, input_rank=None):
    """The block's weight matrix W̄ (d', u), float32, from ``[kernel]`` or ``[kernel, bias]``.

        W̄ = reshape(kernel, (d, u))                   without a bias,   d' = d
        W̄ = [reshape(kernel, (d, u)); biasᵀ]           with a bias,      d' = d + 1

    d = prod(kernel.shape[:input_rank]), u = prod(kernel.shape[input_rank:]) (input_rank
    None: all axes but the last, u = kernel.shape[-1]); the bias has shape
    kernel.shape[input_rank:].  The reshape is row-major (C order), the bias is the last row.
    ``values`` are Keras variables, tf.Variables, tensors or arrays of any float dtype, read
    as float32 (Keras variables without the ``mixed_float16`` autocast, as
    :func:`fastewc.penalty.read_float32`).  A reshape and at most one concatenation: O(d'u)
    time and memory.  Inverse: :func:`split_matrix`.
    """
    values = _check_values(values)
    kernel = read_float32(values[0])
    if kernel.shape.rank is not None and kernel.shape.rank < 1:
        raise ValueError("`values[0]` (the kernel) must have rank >= 1, shape (..., u). "
                         f"Received: shape {tuple(kernel.shape)}")
    if input_rank is None:
        outputs = kernel.shape[-1:]
        units = _dim(kernel, -1)
    else:
        outputs = kernel.shape[input_rank:]
        units = matrix_shape(kernel.shape, input_rank)[1]
    matrix = tf.reshape(kernel, [-1, units])
    if len(values) == 1:
        return matrix
    bias = read_float32(values[1])
    if bias.shape.rank is not None and not bias.shape.is_compatible_with(outputs):
        raise ValueError(f"`values[1]` (the bias) must have shape {tuple(outputs)}, the kernel's "
                         f"output axes. Received: shape {tuple(bias.shape)}")
    return tf.concat([matrix, tf.reshape(bias, [1, units])], axis=0)


def _static_shape(shape, index):
    try:
        dims = tf.TensorShape(shape).as_list()
    except (TypeError, ValueError):
        dims = None
    if dims is None or any(d is None for d in dims):
        raise ValueError(f"`shapes[{index}]` must be a fully defined shape. Received: {shape!r}")
    return dims


def split_matrix(matrix, shapes, input_rank=None):
    """Inverse of :func:`weight_matrix`: the (d', u) matrix back to ``[kernel]`` or
    ``[kernel, bias]`` tensors of the given ``shapes``.

    ``shapes`` is ``[kernel_shape]`` or ``[kernel_shape, bias_shape]`` (fully defined); the
    first d rows become the kernel (row-major reshape), the last row the bias, with (d, u)
    = :func:`matrix_shape` (kernel_shape, input_rank).  The result keeps ``matrix``'s dtype.
    Slices and reshapes: O(d'u).
    """
    if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__len__") or len(shapes) not in (1, 2):
        raise ValueError("`shapes` must be [kernel_shape] or [kernel_shape, bias_shape]. "
                         f"Received: shapes={shapes!r}")
    dims = [_static_shape(s, i) for i, s in enumerate(shapes)]
    kernel_shape = dims[0]
    if not kernel_shape:
        raise ValueError(f"`shapes[0]` (the kernel) must have rank >= 1. Received: {shapes[0]!r}")
    rows, units = matrix_shape(kernel_shape, input_rank)
    outputs = kernel_shape[-1:] if input_rank is None else kernel_shape[input_rank:]
    if len(dims) == 2 and dims[1] != outputs:
        raise ValueError(f"`shapes[1]` (the bias) must be {tuple(outputs)}, the kernel's output "
                         f"axes. Received: {shapes[1]!r}")
    matrix = tf.convert_to_tensor(matrix)
    expected = (rows + len(dims) - 1, units)
    static = tuple(matrix.shape) if matrix.shape.rank is not None else None
    if static is not None and (len(static) != 2 or any(
            s is not None and s != e for s, e in zip(static, expected))):
        raise ValueError(f"`matrix` must have shape {expected} for shapes={shapes!r}. "
                         f"Received: shape {static}")
    out = [tf.reshape(matrix[:rows], kernel_shape)]
    if len(dims) == 2:
        out.append(tf.reshape(matrix[rows], dims[1]))
    return out


# -- the quadratic ----------------------------------------------------------------------
def quadratic_form(delta, a, g):
    """``(q, m)``: m = A Δ G (d', u) and q = Σ Δ ⊙ m = vec(Δ)ᵀ (A ⊗ G) vec(Δ) (scalar).

    With A, G symmetric, m is half the gradient of q w.r.t. Δ (∂q/∂Δ = 2 A Δ G), so the
    EWC penalty λ/2 · q has value ``0.5 * lam * q`` and gradient ``lam * m``.  q ≥ 0 when A
    and G are PSD (up to rounding).

    Args:
      delta: Δ = W̄ − W̄*, shape (d', u).
      a: A, shape (d', d'), symmetric, or its diagonal a, shape (d',) (A = diag(a)).
      g: G, shape (u, u), symmetric.

    Computed in float64 when all three are float64, else in float32.  Two matrix
    products: O(d'²u + d'u²) time, O(d'u) extra memory; no Kronecker product is formed.
    A diagonal A: m = a ⊙ (Δ G) row by row, O(d'u²).
    """
    delta, a, g = tf.convert_to_tensor(delta), tf.convert_to_tensor(a), tf.convert_to_tensor(g)
    dtype = _common_dtype(delta, a, g)
    delta, a, g = _as_float(delta, dtype), _as_float(a, dtype), _as_float(g, dtype)
    if a.shape.rank == 1:
        m = a[:, tf.newaxis] * tf.matmul(delta, g)
    else:
        m = tf.matmul(tf.matmul(a, delta), g)
    q = tf.reduce_sum(delta * m)
    return q, m


# -- damping ----------------------------------------------------------------------------
def check_damping(damping):
    """``damping`` as a float ≥ 0 (Keras-style ValueError otherwise); a tensor passes unchecked."""
    if not isinstance(damping, numbers.Real) and hasattr(damping, "dtype"):
        return damping          # a tensor or variable: checking it would cost a host sync
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 <= damping < np.inf:
        raise ValueError(f"`damping` must be a finite number >= 0. Received: damping={damping!r}")
    return float(damping)


def _pi_correction(a, g):
    """π = sqrt((tr(A)/d') / (tr(G)/u)), the ratio of the factors' mean eigenvalues
    (Martens & Grosse 2015, §6.3); 1 when either trace is ≤ 0 or the ratio is not finite
    (a zero or non-PSD factor never gives a NaN or Inf π).  Scalar of the common dtype
    (float64 when both are float64, else float32).  O(d' + u)."""
    a, g = _as_float(a), _as_float(g)
    dtype = _common_dtype(a, g)
    tr_a, tr_g = tf.cast(_trace(a), dtype), tf.cast(tf.linalg.trace(g), dtype)
    mean_a = tr_a / tf.cast(_dim(a, 0), dtype)
    mean_g = tr_g / tf.cast(_dim(g, 0), dtype)
    ok = (tr_a > 0) & (tr_g > 0)
    ratio = mean_a / tf.where(ok, mean_g, tf.ones_like(mean_g))
    ok = ok & tf.math.is_finite(ratio) & (ratio > 0)
    return tf.where(ok, tf.sqrt(tf.where(ok, ratio, tf.ones_like(ratio))), tf.ones_like(ratio))


def damped_factors(a, g, damping):
    """Factored Tikhonov damping with the π correction (Martens & Grosse 2015, §6.3):

        A_δ = A + π √δ I_d',     G_δ = G + (√δ / π) I_u,     π = sqrt((tr(A)/d') / (tr(G)/u))

    Expanding,

        A_δ ⊗ G_δ = A ⊗ G + √δ (π I ⊗ G + A ⊗ I / π) + δ I,

    i.e. the exact Tikhonov term δ I plus a cross term; π minimises the cross term's trace
    (its nuclear norm for PSD factors), √δ (π d' tr(G) + u tr(A) / π).  π = 1 when either trace is ≤ 0 or
    the ratio is not finite, so a zero or singular factor never produces NaN/Inf; with
    δ > 0 both damped factors are then positive definite whenever A and G are PSD.

    Args:
      a: A (d', d'), symmetric PSD, float32 or float64; or its diagonal (d',), ≥ 0
        (damped as diag(a): a + π√δ, tr(A) = Σ a).
      g: G (u, u), symmetric PSD, float32 or float64.
      damping: δ ≥ 0, a Python float (checked) or a scalar tensor (not checked: reading it
        would cost a host sync; a negative tensor gives NaN).

    Returns ``(A_δ, G_δ)`` in the dtypes of ``a`` and ``g`` (other float dtypes become
    float32); δ = 0 returns values equal to A and G.  O(d'² + u²) time (the identity adds).
    """
    damping = check_damping(damping)
    a, g = _as_float(a), _as_float(g)
    dtype = _common_dtype(a, g)
    pi = _pi_correction(a, g)
    root = tf.sqrt(_as_float(damping, dtype))
    a_shift, g_shift = tf.cast(pi * root, a.dtype), tf.cast(root / pi, g.dtype)
    return _add_to_diagonal(a, a_shift), _add_to_diagonal(g, g_shift)


# -- nearest Kronecker product ----------------------------------------------------------
def _coefficient_vector(coefficients):
    """c as a float64 tensor; a list may mix Python numbers (kept exact) and tensors."""
    if isinstance(coefficients, (list, tuple)) and coefficients:
        return tf.stack([_as_float(c, tf.float64) for c in coefficients])
    if isinstance(coefficients, (list, tuple)):
        return tf.zeros([0], tf.float64)
    return _as_float(coefficients, tf.float64)


def _check_terms(coefficients, a_list, g_list):
    for label, values in (("a_list", a_list), ("g_list", g_list)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise TypeError(f"`{label}` must be a list of square matrices, one per term. "
                            f"Received: {label} of type {type(values).__name__}")
    a_list = [_as_float(a, tf.float64) for a in a_list]
    g_list = [_as_float(g, tf.float64) for g in g_list]
    coefficients = _coefficient_vector(coefficients)
    static = coefficients.shape
    if static.rank != 1 or static[0] != len(a_list) or len(a_list) != len(g_list) or not a_list:
        received = tuple(static) if static.rank is not None else None
        raise ValueError(
            "`coefficients`, `a_list` and `g_list` must have the same length T >= 1, one "
            f"entry per term. Received: coefficients of shape {received}, "
            f"{len(a_list)} a_list and {len(g_list)} g_list")
    for label, values in (("a_list", a_list), ("g_list", g_list)):
        first = values[0].shape
        for i, value in enumerate(values):
            shape = value.shape
            if shape.rank is None:
                continue
            diagonal = label == "a_list" and shape.rank == 1      # A given as its diagonal
            if (not diagonal and (shape.rank != 2 or shape[0] != shape[1])) or not shape.is_compatible_with(first):
                raise ValueError(f"`{label}` must hold square matrices of one shape"
                                 f"{' (or diagonals: vectors of one shape)' if label == 'a_list' else ''}. Received: "
                                 f"{label}[{i}] of shape {tuple(shape)}, {label}[0] of shape "
                                 f"{tuple(first) if first.rank is not None else None}")
    return coefficients, a_list, g_list


def _gram(mats):
    """P_ts = ⟨M_t, M_s⟩_F = Σ M_t ⊙ M_s (= tr(M_t M_s) for symmetric M): T × T, float64."""
    num = len(mats)
    entries = [[None] * num for _ in range(num)]
    for t in range(num):
        for s in range(t, num):
            entries[t][s] = entries[s][t] = tf.reduce_sum(mats[t] * mats[s])
    return tf.stack([tf.stack(row) for row in entries])


def _psd_roots(gram):
    """(P^{1/2}, P^{+1/2}) of a symmetric PSD T × T matrix: its square root and the square
    root of its pseudo-inverse, eigenvalues ≤ T·eps·λ_max treated as 0."""
    lam, vec = tf.linalg.eigh(gram)
    lam = tf.maximum(lam, 0.0)
    tol = gram.shape[0] * np.finfo(np.float64).eps * tf.reduce_max(lam)
    keep = lam > tol
    root = tf.sqrt(lam)
    inv_root = tf.where(keep, 1.0 / tf.where(keep, root, tf.ones_like(root)), tf.zeros_like(root))
    rebuild = lambda d: tf.matmul(vec * d[tf.newaxis, :], vec, transpose_b=True)  # noqa: E731
    return rebuild(root), rebuild(inv_root)


def _combine(weights, mats):
    """Σ_t w_t M_t."""
    return tf.add_n([weights[t] * m for t, m in enumerate(mats)])


def _safe_div(num, den):
    ok = den > 0
    return tf.where(ok, num / tf.where(ok, den, tf.ones_like(den)), tf.zeros_like(num))


def _balance(a, g):
    """Rescale A ← sA, G ← G/s (A ⊗ G unchanged) so that tr(A)/d' = tr(G)/u when both
    traces are > 0; else so that ‖A‖_F/√d' = ‖G‖_F/√u when both norms are > 0; else s = 1."""
    d, u = tf.cast(_dim(a, 0), tf.float64), tf.cast(_dim(g, 0), tf.float64)

    def ratio(num, den):   # num/den, and whether it is usable
        ok = (num > 0) & (den > 0)
        r = num / tf.where(ok, den, tf.ones_like(den))
        return r, ok & tf.math.is_finite(r) & (r > 0)

    by_trace, trace_ok = ratio(tf.linalg.trace(g) / u, _trace(a) / d)
    by_norm, norm_ok = ratio(tf.norm(g) / tf.sqrt(u), tf.norm(a) / tf.sqrt(d))
    one = tf.ones_like(by_trace)
    square = tf.where(trace_ok, by_trace, tf.where(norm_ok, by_norm, one))
    scale = tf.sqrt(square)
    return a * scale, g / scale


def nearest_kronecker(coefficients, a_list, g_list):
    """The Kronecker product A ⊗ G nearest to S = Σ_t c_t A_t ⊗ G_t in Frobenius norm.

    Van Loan & Pitsianis (1993): the rearrangement R maps X ⊗ Y to vec(X) vec(Y)ᵀ and
    preserves the Frobenius norm, so with R(S) = Σ_t c_t vec(A_t) vec(G_t)ᵀ

        min_{A,G} ‖S − A ⊗ G‖_F = min_{x,y} ‖R(S) − x yᵀ‖_F,

    a rank-1 approximation of R(S) (its leading singular triple).  R(S) = U_A C U_Gᵀ with
    U_A = [vec A_1 … vec A_T] (d'² × T), U_G = [vec G_1 … vec G_T] (u² × T) and
    C = diag(c), so nothing larger than T × T is needed:

    * Grams: P = U_Aᵀ U_A and Q = U_Gᵀ U_G, P_ts = ⟨A_t, A_s⟩_F = tr(A_t A_s) and
      Q_ts = tr(G_t G_s) (A, G symmetric; the derivation itself only uses ⟨·,·⟩_F).
    * With P = P^{1/2} P^{1/2}, Q = Q^{1/2} Q^{1/2} (symmetric PSD roots),
      R(S)ᵀ R(S) = U_G C P C U_Gᵀ has the same non-zero eigenvalues as
      MᵀM, M = P^{1/2} C Q^{1/2} (T × T): R(S) and M share their singular values σ_i.
    * If b is M's leading right singular vector, β = Q^{+1/2} b (pseudo-inverse root) gives
      y = U_G β, a unit vector (βᵀQβ = ‖b‖² = 1) and R(S)'s leading right singular vector.
      The best x for that y is R(S) y / ‖y‖² = U_A C Q β / (βᵀ Q β).  Hence

          G = Σ_t β_t G_t,    A = Σ_t α_t A_t,    α = C Q β / (βᵀ Q β).

      (Only one pseudo-inverse is used: A is R(S) applied to y, so it is the best partner
      of whatever y is returned.)
    * Error: ‖S − A ⊗ G‖_F² = Σ_{i≥2} σ_i², ‖S‖_F² = Σ_i σ_i² = cᵀ (P ∘ Q) c, so the
      relative error sqrt(Σ_{i≥2} σ_i² / Σ_i σ_i²) comes from M's singular values without
      cancellation (0 when S = 0).  Near-singular Grams lose half their digits in the
      square roots: expect ~1e-8 where the exact error is 0.

    Signs: for PSD A_t, G_t the Grams have non-negative entries, and with c ≥ 0 so does
    C P C Q, whose Perron vector (Perron–Frobenius) is R(S)'s leading β.  β is oriented so
    that its largest-magnitude entry is positive, and when c ≥ 0 and the Grams are
    non-negative (up to rounding) negative entries of β and α are clipped to 0 (rounding,
    or the choice within a degenerate leading space); A and G are then non-negative
    combinations of PSD matrices, hence PSD.

    Scale: A ⊗ G fixes A and G up to A ← sA, G ← G/s; s is chosen so that
    tr(A)/d' = tr(G)/u when both traces are > 0 (π = 1 in :func:`damped_factors`), else
    ‖A‖_F/√d' = ‖G‖_F/√u when both are non-zero, else s = 1.  T = 1 returns (s·c·A_1, G_1/s).

    Args:
      coefficients: c, T numbers (a list or a tensor of shape (T,)).
      a_list: T matrices A_t (d', d'), symmetric (PSD for the sign guarantee), or T
        diagonals (d',) (A_t = diag(a_t), ⟨A_t, A_s⟩_F = Σ a_t ⊙ a_s; A is then a diagonal).
      g_list: T matrices G_t (u, u), symmetric (PSD for the sign guarantee).

    Returns ``(A, G, relative_error)``, float64 (inputs are cast to float64).  Finite when
    every term is zero (A = G = 0, error 0) or some terms are zero.  Cost: T(T+1)/2
    Frobenius products per factor, O(T²(d'² + u²)), two T × T eigendecompositions and a
    T × T SVD, and T-term sums for A and G; memory: the float64 copies of the inputs plus
    A and G.  T is static (the length of the lists): one trace per T.
    """
    c, a_list, g_list = _check_terms(coefficients, a_list, g_list)
    with tf.name_scope("fastewc/nearest_kronecker"):
        num = len(a_list)
        p, q = _gram(a_list), _gram(g_list)
        p_root, _ = _psd_roots(p)
        q_root, q_inv_root = _psd_roots(q)
        m = tf.matmul(p_root * c[tf.newaxis, :], q_root)          # P^{1/2} C Q^{1/2}
        sigma, _, right = tf.linalg.svd(m)
        top = tf.argmax(sigma)
        beta = tf.linalg.matvec(q_inv_root, tf.gather(right, top, axis=1))
        largest = tf.gather(beta, tf.argmax(tf.abs(beta)))
        beta = tf.where(largest < 0, -beta, beta)
        nonneg = _nonnegative_problem(c, p, q)
        beta = tf.where(nonneg, tf.maximum(beta, 0.0), beta)
        q_beta = tf.linalg.matvec(q, beta)
        alpha = _safe_div(c * q_beta, tf.reduce_sum(beta * q_beta))
        alpha = tf.where(nonneg, tf.maximum(alpha, 0.0), alpha)
        a, g = _balance(_combine(alpha, a_list), _combine(beta, g_list))
        # S = 0 (e.g. every A_t = 0): both factors 0, not a zero A beside an arbitrary G
        # (damping would read that G).
        nonzero = tf.reduce_max(sigma) > 0
        a, g = tf.where(nonzero, a, tf.zeros_like(a)), tf.where(nonzero, g, tf.zeros_like(g))
        squares = tf.square(sigma)
        rest = tf.reduce_sum(tf.where(tf.one_hot(top, num, on_value=True, off_value=False),
                                      tf.zeros_like(squares), squares))
        error = tf.sqrt(_safe_div(rest, tf.reduce_sum(squares)))
        return a, g, error


def _nonnegative_problem(c, p, q):
    """Whether c ≥ 0 and both Grams are entrywise ≥ 0 up to rounding (|P_ts| ≤ tr(P))."""
    tol = c.shape[0] * np.finfo(np.float64).eps
    return (tf.reduce_all(c >= 0)
            & tf.reduce_all(p >= -tol * tf.linalg.trace(p))
            & tf.reduce_all(q >= -tol * tf.linalg.trace(q)))
