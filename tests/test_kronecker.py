"""The Kronecker-factored maths against float64 NumPy references with explicit np.kron."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from fastewc import kfac_penalty, kronecker

D, U = 5, 3   # d' and u of the small reference blocks


# -- float64 references, written out independently ---------------------------------------
def random_psd(rng, n, rank=None):
    x = rng.normal(size=(n, n if rank is None else rank))
    return x @ x.T


def vec(m):
    """Row-major vec, the module's convention."""
    return np.reshape(np.asarray(m, np.float64), -1)


def rearranged(s, d, u):
    """Van Loan–Pitsianis rearrangement of a (d·u × d·u) matrix: row (i, k) is the
    flattened (u × u) block S[i·u:(i+1)·u, k·u:(k+1)·u], so R(X ⊗ Y) = vec(X) vec(Y)ᵀ."""
    return np.stack([s[i * u:(i + 1) * u, k * u:(k + 1) * u].reshape(-1)
                     for i in range(d) for k in range(d)])


def brute_nearest(s, d, u):
    """The optimal A ⊗ G from the SVD of the explicit rearranged matrix."""
    left, sigma, right = np.linalg.svd(rearranged(s, d, u))
    return np.kron(sigma[0] * left[:, 0].reshape(d, d), right[0].reshape(u, u))


def kron_sum(coefficients, a_list, g_list):
    return sum(c * np.kron(a, g) for c, a, g in zip(coefficients, a_list, g_list))


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)


# -- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_shape, bias", [((4, 3), True), ((2, 2, 3, 5), True),
                                                 ((4, 3), False), ((2, 2, 3, 5), False)])
def test_weight_matrix_round_trip(kernel_shape, bias):
    rng = np.random.default_rng(0)
    units = kernel_shape[-1]
    kernel = rng.normal(size=kernel_shape)          # float64 in: cast to float32
    values = [kernel, rng.normal(size=(units,))] if bias else [kernel]
    matrix = kronecker.weight_matrix(values)
    rows = int(np.prod(kernel_shape[:-1]))
    assert matrix.dtype == tf.float32
    assert matrix.shape == (rows + bias, units)
    np.testing.assert_allclose(matrix[:rows], kernel.reshape(-1, units), rtol=1e-6)
    if bias:
        np.testing.assert_allclose(matrix[-1], values[1], rtol=1e-6)
    shapes = [kernel_shape, (units,)] if bias else [kernel_shape]
    back = kronecker.split_matrix(matrix, shapes)
    assert [tuple(b.shape) for b in back] == [tuple(s) for s in shapes]
    for b, v in zip(back, values):
        np.testing.assert_allclose(b, v, rtol=1e-6)


def test_weight_matrix_reads_keras_variables():
    layer = keras.layers.Conv2D(5, 2)
    layer.build((None, 4, 4, 3))
    matrix = kronecker.weight_matrix([layer.kernel, layer.bias])
    expected = np.concatenate([np.reshape(layer.kernel.numpy(), (-1, 5)), layer.bias.numpy()[None]])
    np.testing.assert_array_equal(matrix, expected)


def test_layout_bad_input():
    with pytest.raises(ValueError, match="values"):
        kronecker.weight_matrix([])
    with pytest.raises(ValueError, match="bias"):
        kronecker.weight_matrix([np.zeros((4, 3)), np.zeros(2)])
    with pytest.raises(ValueError, match="matrix"):
        kronecker.split_matrix(np.zeros((4, 3)), [(4, 3), (3,)])
    with pytest.raises(ValueError, match="shapes"):
        kronecker.split_matrix(np.zeros((5, 3)), [(4, 3), (2,)])


# -- the quadratic --------------------------------------------------------------------------
def _quadratic_case(rng):
    return (rng.normal(size=(D, U)), random_psd(rng, D), random_psd(rng, U))


def _check_quadratic(q, m, delta, a, g):
    kron = np.kron(a, g)
    q_ref = vec(delta) @ kron @ vec(delta)
    grad_ref = (2 * kron @ vec(delta)).reshape(D, U)     # ∂/∂Δ of vec(Δ)ᵀ (A⊗G) vec(Δ)
    assert abs(float(q) - q_ref) <= 1e-5 * abs(q_ref)
    assert rel(m, 0.5 * grad_ref) < 1e-5


def test_quadratic_form_matches_kron():
    rng = np.random.default_rng(1)
    delta, a, g = _quadratic_case(rng)
    q, m = kronecker.quadratic_form(*(x.astype(np.float32) for x in (delta, a, g)))
    assert q.dtype == tf.float32 and m.shape == (D, U)
    _check_quadratic(q, m, delta, a, g)
    # the gradient by autodiff is 2m, the same reference
    d32 = tf.constant(delta, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(d32)
        q2, _ = kronecker.quadratic_form(d32, a.astype(np.float32), g.astype(np.float32))
    assert rel(tape.gradient(q2, d32), 2 * np.asarray(m)) < 1e-5


def test_quadratic_form_under_xla():
    rng = np.random.default_rng(2)
    delta, a, g = _quadratic_case(rng)
    fn = tf.function(kronecker.quadratic_form, jit_compile=True)
    q, m = fn(*(tf.constant(x, tf.float32) for x in (delta, a, g)))
    _check_quadratic(q, m, delta, a, g)


def test_quadratic_form_float64_stays_float64():
    rng = np.random.default_rng(3)
    delta, a, g = _quadratic_case(rng)
    q, m = kronecker.quadratic_form(delta, a, g)
    assert q.dtype == tf.float64 and m.dtype == tf.float64
    np.testing.assert_allclose(float(q), vec(delta) @ np.kron(a, g) @ vec(delta), rtol=1e-12)


# -- damping --------------------------------------------------------------------------------
def test_damping_zero_returns_the_factors():
    rng = np.random.default_rng(4)
    a, g = random_psd(rng, D).astype(np.float32), random_psd(rng, U).astype(np.float32)
    for damping in (0.0, tf.constant(0.0)):
        ad, gd = kronecker.damped_factors(a, g, damping)
        np.testing.assert_array_equal(ad, a)
        np.testing.assert_array_equal(gd, g)


def test_damping_pi_and_expansion():
    rng = np.random.default_rng(5)
    a, g, damping = random_psd(rng, D), 7.0 * random_psd(rng, U), 0.3
    pi = np.sqrt((np.trace(a) / D) / (np.trace(g) / U))
    ad, gd = kronecker.damped_factors(a, g, damping)
    assert ad.dtype == tf.float64
    np.testing.assert_allclose(ad, a + pi * np.sqrt(damping) * np.eye(D), rtol=1e-12)
    np.testing.assert_allclose(gd, g + np.sqrt(damping) / pi * np.eye(U), rtol=1e-12)
    cross = pi * np.kron(np.eye(D), g) + np.kron(a, np.eye(U)) / pi
    expansion = np.kron(a, g) + np.sqrt(damping) * cross + damping * np.eye(D * U)
    assert rel(np.kron(ad, gd), expansion) < 1e-12
    # float32 and a tensor damping, under XLA
    fn = tf.function(kronecker.damped_factors, jit_compile=True)
    ad32, gd32 = fn(tf.constant(a, tf.float32), tf.constant(g, tf.float32), tf.constant(damping))
    assert ad32.dtype == tf.float32
    assert rel(ad32, ad) < 1e-6 and rel(gd32, gd) < 1e-6


@pytest.mark.parametrize("case", ["rank1_a", "zero_a", "zero_g", "both_zero"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_damping_singular_factors_stay_finite(case, damping):
    rng = np.random.default_rng(6)
    a, g = random_psd(rng, D), random_psd(rng, U)
    if case == "rank1_a":
        a = random_psd(rng, D, rank=1)
    if case in ("zero_a", "both_zero"):
        a = np.zeros((D, D))
    if case in ("zero_g", "both_zero"):
        g = np.zeros((U, U))
    a, g = a.astype(np.float32), g.astype(np.float32)
    ad, gd = kronecker.damped_factors(a, g, damping)
    assert np.all(np.isfinite(ad)) and np.all(np.isfinite(gd))
    if case != "rank1_a":    # π = 1 when a trace is 0
        np.testing.assert_allclose(ad, a + np.sqrt(damping) * np.eye(D), rtol=1e-6)
        np.testing.assert_allclose(gd, g + np.sqrt(damping) * np.eye(U), rtol=1e-6)
    if damping > 0:   # damped factors are positive definite
        assert np.linalg.eigvalsh(np.asarray(ad, np.float64)).min() > 0
        assert np.linalg.eigvalsh(np.asarray(gd, np.float64)).min() > 0
    q, m = kronecker.quadratic_form(rng.normal(size=(D, U)).astype(np.float32), ad, gd)
    assert np.isfinite(float(q)) and float(q) >= -1e-4 and np.all(np.isfinite(m))


def test_damping_bad_input():
    a, g = np.eye(D), np.eye(U)
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="damping"):
            kronecker.damped_factors(a, g, bad)


# -- nearest Kronecker product ----------------------------------------------------------------
def _nearest(coefficients, a_list, g_list, jit=False):
    fn = kronecker.nearest_kronecker
    if jit:
        fn = tf.function(fn, jit_compile=True)
    a, g, error = fn(coefficients, a_list, g_list)
    assert a.dtype == tf.float64 and g.dtype == tf.float64
    return np.asarray(a), np.asarray(g), float(error)


def _assert_psd(m):
    eig = np.linalg.eigvalsh(m)
    assert eig.min() >= -1e-10 * max(abs(eig).max(), 1e-300)


def _assert_balanced(a, g):
    np.testing.assert_allclose(np.trace(a) / len(a), np.trace(g) / len(g), rtol=1e-10)


def test_nearest_one_term_is_exact():
    rng = np.random.default_rng(7)
    a1, g1 = random_psd(rng, D), random_psd(rng, U)
    a, g, error = _nearest([2.5], [a1.astype(np.float32)], [g1.astype(np.float32)])
    assert error == 0.0
    assert rel(np.kron(a, g), 2.5 * np.kron(a1, g1)) < 1e-6        # float32 inputs
    scale = np.trace(a) / np.trace(a1)
    assert rel(a, scale * a1) < 1e-6 and rel(g, 2.5 / scale * g1) < 1e-6
    _assert_balanced(a, g)


def test_nearest_shared_g_is_exact():
    rng = np.random.default_rng(8)
    a_list, g = [random_psd(rng, D) for _ in range(3)], random_psd(rng, U)
    c = [0.5, 1.0, 2.0]
    a_out, g_out, error = _nearest(c, a_list, [g, g, g])
    target = np.kron(sum(ci * ai for ci, ai in zip(c, a_list)), g)
    assert rel(np.kron(a_out, g_out), target) < 1e-10
    assert error < 1e-7


@pytest.mark.parametrize("num_terms", [2, 3])
@pytest.mark.parametrize("jit", [False, True])
def test_nearest_matches_brute_force(num_terms, jit):
    rng = np.random.default_rng(10 + num_terms)
    a_list = [random_psd(rng, D, rank=r) for r in (D, 2, 4)[:num_terms]]
    g_list = [random_psd(rng, U, rank=r) for r in (U, 1, 2)[:num_terms]]
    c = rng.uniform(0.2, 2.0, size=num_terms)
    s = kron_sum(c, a_list, g_list)
    a, g, error = _nearest(tf.constant(c), a_list, g_list, jit=jit)
    best = np.kron(a, g)
    assert rel(best, brute_nearest(s, D, U)) < 1e-6
    explicit = np.linalg.norm(s - best) / np.linalg.norm(s)
    assert explicit > 1e-3                          # a genuine approximation
    np.testing.assert_allclose(error, explicit, rtol=1e-6)
    _assert_psd(a)
    _assert_psd(g)
    _assert_balanced(a, g)


def test_nearest_in_graph_with_tensor_coefficients():
    """Coefficients may be a list mixing a traced scalar and Python floats."""
    rng = np.random.default_rng(9)
    a_list, g_list = [random_psd(rng, D), random_psd(rng, D)], [random_psd(rng, U), random_psd(rng, U)]
    fn = tf.function(lambda x: kronecker.nearest_kronecker([x, 0.7], a_list, g_list),
                     autograph=False)
    a, g, error = fn(tf.constant(1.3, tf.float64))
    a_ref, g_ref, error_ref = _nearest([1.3, 0.7], a_list, g_list)
    assert rel(np.kron(a, g), np.kron(a_ref, g_ref)) < 1e-12
    np.testing.assert_allclose(float(error), error_ref, rtol=1e-10)


def test_nearest_orthogonal_terms_stay_psd():
    """tr(A_1 A_2) = tr(G_1 G_2) = 0 and equal weights: the leading singular value is
    double, and the returned pair must still be optimal and PSD."""
    a1, a2 = np.diag([1.0, 1, 0, 0, 0]), np.diag([0.0, 0, 1, 1, 0])
    g1, g2 = np.diag([2.0, 0, 0]), np.diag([0.0, 2, 0])
    s = kron_sum([1.0, 1.0], [a1, a2], [g1, g2])
    a, g, error = _nearest([1.0, 1.0], [a1, a2], [g1, g2])
    _assert_psd(a)
    _assert_psd(g)
    explicit = np.linalg.norm(s - np.kron(a, g)) / np.linalg.norm(s)
    np.testing.assert_allclose(explicit, np.sqrt(0.5), rtol=1e-10)   # the optimum
    np.testing.assert_allclose(error, explicit, rtol=1e-10)


def test_nearest_zero_terms_are_safe():
    rng = np.random.default_rng(20)
    zeros_a, zeros_g = np.zeros((D, D)), np.zeros((U, U))
    a, g, error = _nearest([1.0, 1.0], [zeros_a, zeros_a], [zeros_g, zeros_g])
    assert error == 0.0
    np.testing.assert_array_equal(a, zeros_a)
    np.testing.assert_array_equal(g, zeros_g)
    a1, g1 = random_psd(rng, D), random_psd(rng, U)
    for c, a_list, g_list in [([1.0, 1.0], [a1, zeros_a], [g1, random_psd(rng, U)]),
                              ([1.0, 1.0], [a1, random_psd(rng, D)], [g1, zeros_g]),
                              ([1.0, 0.0], [a1, random_psd(rng, D)], [g1, random_psd(rng, U)])]:
        a, g, error = _nearest(c, a_list, g_list)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(g))
        assert rel(np.kron(a, g), np.kron(a1, g1)) < 1e-10
        assert error < 1e-7
        _assert_balanced(a, g)


def test_nearest_bad_input():
    a, g = np.eye(D), np.eye(U)
    with pytest.raises(ValueError, match="`coefficients`, `a_list` and `g_list`"):
        kronecker.nearest_kronecker([1.0, 2.0], [a], [g])
    with pytest.raises(ValueError, match="1 a_list and 2 g_list"):
        kronecker.nearest_kronecker([1.0], [a], [g, g])
    with pytest.raises(ValueError, match="same length"):
        kronecker.nearest_kronecker([], [], [])
    with pytest.raises(ValueError, match="a_list"):
        kronecker.nearest_kronecker([1.0, 1.0], [a, np.eye(D + 1)], [g, g])


@pytest.mark.parametrize("inline", [False, True])
def test_kfac_penalty_and_gradients_matches_explicit_kron(inline):
    """The standalone Kronecker penalty (``fastewc.kfac_penalty``): two blocks (a kernel
    with its bias, a kernel alone), two terms each, against vec(ΔW̄)ᵀ(A ⊗ G)vec(ΔW̄) with
    np.kron in float64; its gradient through the tape is the analytic one."""
    rng = np.random.default_rng(7)
    lam = 3.0
    shapes = [((3, 2), True), ((2, 4), False)]
    blocks, want_value, want_grads = [], 0.0, []
    for kernel_shape, bias in shapes:
        d, u = kernel_shape[0] + bias, kernel_shape[1]
        thetas = [rng.normal(size=kernel_shape)] + ([rng.normal(size=(u,))] if bias else [])
        w = np.concatenate([thetas[0]] + ([thetas[1][None]] if bias else []), axis=0)
        terms, grad = [], np.zeros((d, u))
        for _ in range(2):
            coef, a, g, anchor = rng.uniform(0.5, 2.0), random_psd(rng, d), random_psd(rng, u), rng.normal(size=(d, u))
            terms.append(tuple(tf.constant(np.asarray(x, np.float32)) for x in (coef, a, g, anchor)))
            delta = w - anchor
            want_value += 0.5 * lam * coef * vec(delta) @ np.kron(a, g) @ vec(delta)
            grad += lam * coef * (np.kron(a, g) @ vec(delta)).reshape(d, u)
        want_grads += [grad[:kernel_shape[0]]] + ([grad[-1]] if bias else [])
        blocks.append(([tf.Variable(np.asarray(t, np.float32)) for t in thetas], terms))
    variables = [v for thetas, _ in blocks for v in thetas]
    with tf.GradientTape() as tape:
        value, grads = kfac_penalty.kfac_penalty_and_gradients(
            [([v.read_value() for v in thetas], terms) for thetas, terms in blocks], lam, inline=inline)
    assert rel(float(value), want_value) < 1e-5
    for got, want in zip(grads, want_grads, strict=True):
        assert rel(got.numpy(), want) < 1e-5
    if not inline:
        for got, want in zip(tape.gradient(value, variables), want_grads, strict=True):
            assert rel(got.numpy(), want) < 1e-5
