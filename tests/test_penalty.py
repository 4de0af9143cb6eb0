"""The pure penalty core against float64 NumPy / autodiff references of the naive form."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import fastewc
from fastewc import penalty as penalty_lib

SHAPES = [(4, 3), (3,), (2, 2, 3), ()]
LAM = 2.5


# -- float64 references, written out independently ---------------------------------------
def naive_value(thetas, tasks, lam):
    """Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² in float64 NumPy."""
    return sum(0.5 * lam * np.sum(np.asarray(f, np.float64) * (np.asarray(th, np.float64) - np.asarray(a, np.float64)) ** 2)
               for fs, anchors in tasks for th, f, a in zip(thetas, fs, anchors))


def naive_grads(thetas, tasks, lam):
    """Autodiff (GradientTape, float64) of the naive per-task sum."""
    th64 = [tf.constant(np.asarray(t, np.float64)) for t in thetas]
    with tf.GradientTape() as tape:
        tape.watch(th64)
        total = tf.add_n([0.5 * lam * tf.reduce_sum(tf.constant(f, tf.float64) * tf.square(t - tf.constant(a, tf.float64)))
                          for fs, anchors in tasks for t, f, a in zip(th64, fs, anchors)])
    return [g.numpy() for g in tape.gradient(total, th64)]


def random_tasks(rng, num_tasks, shapes=SHAPES, zero_frac=0.3):
    """T tasks (F_t, θ_t); some Fisher entries are exactly 0 in every task."""
    dead = [rng.random(s) < zero_frac for s in shapes]
    tasks = []
    for _ in range(num_tasks):
        fs = [np.where(d, 0.0, rng.gamma(0.5, 1.0, s)).astype(np.float32) for s, d in zip(shapes, dead)]
        anchors = [rng.normal(size=s).astype(np.float32) for s in shapes]
        tasks.append((fs, anchors))
    return tasks


def merged_state(tasks):
    """Fold the tasks with merge_separate: (A, μ) as float32 lists and c as a float."""
    a = [np.zeros(np.shape(f), np.float32) for f in tasks[0][0]]
    mu = [np.zeros(np.shape(f), np.float32) for f in tasks[0][0]]
    c = 0.0
    for fs, anchors in tasks:
        out = [fastewc.merge_separate(ai, mi, f, t) for ai, mi, f, t in zip(a, mu, fs, anchors)]
        a = [o[0].numpy().astype(np.float32) for o in out]
        mu = [o[1].numpy().astype(np.float32) for o in out]
        c += sum(float(o[2]) for o in out)
    return a, mu, c


def variables_at(rng, shapes=SHAPES):
    return [tf.Variable(rng.normal(size=s).astype(np.float32)) for s in shapes]


def value_and_tape_grads(variables, a, mu, c, lam=LAM, fn=None):
    with tf.GradientTape() as tape:
        value = (fn or fastewc.ewc_penalty)(variables, a, mu, lam, const=c)
    return value, tape.gradient(value, variables)


# -- separate mode: one quadratic equals the per-task sum ---------------------------------
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 5])
def test_separate_equals_naive_sum_and_its_autodiff(num_tasks):
    rng = np.random.default_rng(num_tasks)
    tasks = random_tasks(rng, num_tasks)
    a, mu, c = merged_state(tasks)
    variables = variables_at(rng)
    value, grads = value_and_tape_grads(variables, a, mu, c)
    thetas = [v.numpy() for v in variables]
    assert value.shape == () and value.dtype == tf.float32
    np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks, LAM), rtol=1e-5)
    for g, want, v in zip(grads, naive_grads(thetas, tasks, LAM), variables):
        assert g.shape == v.shape and g.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)
    assert all(np.all(np.isfinite(m)) for m in mu)


def test_merge_keeps_mean_finite_where_fisher_is_zero():
    a0, mu0 = np.array([0.0, 0.0, 2.0]), np.array([5.0, 5.0, 1.0])
    f, theta = np.array([0.0, 3.0, 0.0]), np.array([7.0, 7.0, 7.0])
    a1, mu1, dc = fastewc.merge_separate(a0, mu0, f, theta)
    assert a1.dtype == tf.float64
    np.testing.assert_array_equal(a1.numpy(), [0.0, 3.0, 2.0])
    np.testing.assert_array_equal(mu1.numpy(), [7.0, 7.0, 1.0])   # latest anchor, anchor, unchanged
    assert float(dc) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(-5, 5), st.floats(0, 10), st.floats(-5, 5),
                          st.floats(-5, 5)), min_size=1, max_size=6))
def test_merge_separate_is_an_identity_of_parabolas(rows):
    a, mu, f, theta, x = (np.array(col, np.float64) for col in zip(*rows))
    a1, mu1, dc = fastewc.merge_separate(a, mu, f, theta)
    lhs = np.sum(a * (x - mu) ** 2 + f * (x - theta) ** 2)
    rhs = np.sum(a1.numpy() * (x - mu1.numpy()) ** 2) + float(dc)
    np.testing.assert_allclose(rhs, lhs, rtol=1e-9, atol=1e-9)
    assert float(dc) >= 0.0


# -- online mode --------------------------------------------------------------------------
def test_online_matches_its_formula():
    rng = np.random.default_rng(0)
    tasks = random_tasks(rng, 3)
    gamma = 0.7
    f = [np.zeros(s, np.float32) for s in SHAPES]
    anchor = [np.zeros(s, np.float32) for s in SHAPES]
    for fs, anchors in tasks:
        out = [fastewc.merge_online(fi, ai, fn, tn, gamma) for fi, ai, fn, tn in zip(f, anchor, fs, anchors)]
        f = [o[0].numpy().astype(np.float32) for o in out]
        anchor = [o[1].numpy().astype(np.float32) for o in out]
    (f1, _), (f2, _), (f3, th3) = tasks
    want_f = [gamma ** 2 * np.float64(x) + gamma * np.float64(y) + np.float64(z) for x, y, z in zip(f1, f2, f3)]
    for got, want in zip(f, want_f):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(anchor, th3):
        np.testing.assert_array_equal(got, want)
    variables = variables_at(rng)
    value, grads = value_and_tape_grads(variables, f, anchor, 0.0)
    thetas = [v.numpy() for v in variables]
    np.testing.assert_allclose(value.numpy(), naive_value(thetas, [(want_f, th3)], LAM), rtol=1e-5)
    for g, want in zip(grads, naive_grads(thetas, [(want_f, th3)], LAM)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)


# -- the fused function -------------------------------------------------------------------
def test_zero_at_a_single_tasks_anchor():
    rng = np.random.default_rng(1)
    tasks = random_tasks(rng, 1)
    a, mu, c = merged_state(tasks)
    assert c == 0.0
    variables = [tf.Variable(t) for t in tasks[0][1]]
    value, grads = value_and_tape_grads(variables, a, mu, c)
    assert value.numpy() == 0.0
    assert all(np.all(g.numpy() == 0.0) for g in grads)


def test_gradient_functions_agree_with_the_custom_gradient():
    rng = np.random.default_rng(2)
    a, mu, c = merged_state(random_tasks(rng, 3))
    variables = variables_at(rng)
    value, tape_grads = value_and_tape_grads(variables, a, mu, c)
    direct = fastewc.ewc_penalty_gradients(variables, a, mu, LAM)
    value2, fused = fastewc.ewc_penalty_and_gradients(variables, a, mu, LAM, const=c)
    assert value2.numpy() == value.numpy()
    for t, d, f in zip(tape_grads, direct, fused):
        np.testing.assert_allclose(d.numpy(), t.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(f.numpy(), t.numpy())


@pytest.mark.parametrize("jit", [False, True])
def test_inline_pass_matches_the_naive_sum_inside_a_compiled_function(jit):
    """inline=True (what train steps use): traced into the caller, the same value and
    gradient as the per-task sum (its value is then differentiated by plain autodiff)."""
    rng = np.random.default_rng(4)
    tasks = random_tasks(rng, 3)
    a, mu, c = merged_state(tasks)
    variables = variables_at(rng)
    thetas = [v.numpy() for v in variables]

    @tf.function(jit_compile=jit)
    def inline():
        with tf.GradientTape() as tape:
            value, grads = fastewc.ewc_penalty_and_gradients(variables, a, mu, LAM, const=c,
                                                             inline=True)
        return value, grads, tape.gradient(value, variables)

    value, grads, taped = inline()
    np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks, LAM), rtol=1e-5)
    for g, t, want in zip(grads, taped, naive_grads(thetas, tasks, LAM)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t.numpy(), want, rtol=1e-5, atol=1e-5)


def test_upstream_gradient_scales_and_constants_get_no_gradient():
    rng = np.random.default_rng(3)
    a, mu, c = merged_state(random_tasks(rng, 2))
    variables = variables_at(rng)
    a_t = [tf.constant(x) for x in a]
    mu_t = [tf.constant(x) for x in mu]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(a_t + mu_t)
        value = 3.0 * fastewc.ewc_penalty(variables, a_t, mu_t, LAM, const=c)
    grads = tape.gradient(value, variables)
    for g, d in zip(grads, fastewc.ewc_penalty_gradients(variables, a, mu, LAM)):
        np.testing.assert_allclose(g.numpy(), 3.0 * d.numpy(), rtol=1e-6, atol=1e-7)
    assert all(g is None for g in tape.gradient(value, a_t + mu_t))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_matches_eager_and_does_not_retrace(jit_compile):
    rng = np.random.default_rng(4)
    variables = variables_at(rng)
    a_vars = [tf.Variable(np.zeros(s, np.float32)) for s in SHAPES]
    mu_vars = [tf.Variable(np.zeros(s, np.float32)) for s in SHAPES]
    c_var = tf.Variable(0.0)

    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            value = fastewc.ewc_penalty(variables, a_vars, mu_vars, LAM, const=c_var)
        return value, tape.gradient(value, variables)

    inner = penalty_lib.compiled("value_and_grads")
    step()
    inner_traces = inner.experimental_get_tracing_count()
    for num_tasks in (1, 2, 3):   # new state values, same shapes: no retrace
        tasks = random_tasks(rng, num_tasks)
        a, mu, c = merged_state(tasks)
        for var, x in zip(a_vars + mu_vars, a + mu):
            var.assign(x)
        c_var.assign(c)
        value, grads = step()
        thetas = [v.numpy() for v in variables]
        np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks, LAM), rtol=1e-5)
        for g, want in zip(grads, naive_grads(thetas, tasks, LAM)):
            np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)
    assert step.experimental_get_tracing_count() == 1
    assert inner.experimental_get_tracing_count() == inner_traces


def test_float32_under_mixed_precision_autocast():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = keras.layers.Dense(3)
        layer.build((None, 5))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    variables = layer.trainable_variables
    assert all(v.dtype == "float32" for v in variables)
    rng = np.random.default_rng(5)
    shapes = [tuple(v.shape) for v in variables]
    tasks = random_tasks(rng, 2, shapes)
    a, mu, c = merged_state(tasks)
    for v in variables:   # values that float16 would round
        v.assign(rng.normal(size=v.shape).astype(np.float32) * (1 + 1e-4))
    from keras.src.backend.common.variables import AutocastScope
    with tf.GradientTape() as tape:
        with AutocastScope("float16"):   # as inside a mixed_float16 layer call
            assert variables[0].value.dtype == "float16"
            value = fastewc.ewc_penalty(variables, a, mu, LAM, const=c)
    grads = tape.gradient(value, variables)
    assert value.dtype == tf.float32 and all(g.dtype == tf.float32 for g in grads)
    thetas = [v.numpy() for v in variables]
    np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks, LAM), rtol=1e-5)
    for g, want in zip(grads, naive_grads(thetas, tasks, LAM)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-5)


def test_no_variables_gives_the_constant():
    value, grads = fastewc.ewc_penalty_and_gradients([], [], [], 2.0, const=3.0)
    assert value.numpy() == 3.0 and grads == []


def test_misaligned_inputs_raise():
    v = [tf.Variable(tf.zeros((2, 3)))]
    with pytest.raises(ValueError, match="same length"):
        fastewc.ewc_penalty(v, [tf.zeros((2, 3))] * 2, [tf.zeros((2, 3))], 1.0)
    with pytest.raises(ValueError, match=r"`anchors\[0\]` must have the shape .*\(2, 3\). Received: shape \(3, 2\)"):
        fastewc.ewc_penalty(v, [tf.zeros((2, 3))], [tf.zeros((3, 2))], 1.0)
    with pytest.raises(ValueError, match="`jit_compile` must be None, True or False"):
        fastewc.ewc_penalty_gradients(v, [tf.zeros((2, 3))], [tf.zeros((2, 3))], 1.0, jit_compile="yes")


@pytest.mark.parametrize("online", [False, True])
def test_merge_all_is_each_variables_merge_and_flags_bad_values(online):
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2,)]
    a = [rng.uniform(0, 1, s) for s in shapes]
    mu = [rng.normal(size=s) for s in shapes]
    f = [rng.uniform(0, 1, s) for s in shapes]
    theta = [rng.normal(size=s) for s in shapes]
    to32 = lambda xs: [tf.constant(x, tf.float32) for x in xs]  # noqa: E731
    a_new, mu_new, dc, bad = penalty_lib.merge_all(to32(a), to32(mu), to32(f), to32(theta),
                                                   online, tf.constant(0.5, tf.float64))
    want_dc = 0.0
    for j in range(len(shapes)):
        args = [tf.constant(np.float32(x[j]), tf.float64) for x in (a, mu, f, theta)]
        if online:
            want_a, want_mu = fastewc.merge_online(*args, 0.5)
        else:
            want_a, want_mu, d = fastewc.merge_separate(*args)
            want_dc += float(d)
        assert a_new[j].dtype == tf.float32 and mu_new[j].dtype == tf.float32
        np.testing.assert_allclose(a_new[j].numpy(), want_a.numpy(), rtol=1e-6)
        np.testing.assert_allclose(mu_new[j].numpy(), want_mu.numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(dc), want_dc, rtol=1e-12)
    assert not bad.numpy().any()
    f[1][0], theta[0][0, 0] = -1.0, np.inf
    _, _, _, bad = penalty_lib.merge_all(to32(a), to32(mu), to32(f), to32(theta),
                                         online, tf.constant(0.5, tf.float64))
    assert bad.numpy().tolist() == [[False, True], [True, False]]


def test_lam_tensors_pass_unchecked_and_numbers_are_checked():
    v = [tf.Variable(tf.ones((2,)))]
    f, a = [tf.ones((2,))], [tf.zeros((2,))]
    assert float(fastewc.ewc_penalty(v, f, a, tf.Variable(4.0))) == 4.0
    assert float(fastewc.ewc_penalty(v, f, a, np.float64(4.0))) == 4.0
    with pytest.raises(ValueError, match=r"`lam` must be >= 0. Received: lam=-1.0"):
        fastewc.ewc_penalty_gradients(v, f, a, -1.0)


@pytest.mark.parametrize("online", [False, True])
def test_merge_all_merges_one_piece_at_a_time(online, monkeypatch):
    """Each variable, or each flat piece of at most MERGE_PIECE_FLOATS floats of a larger
    one, is merged by its own call (its float64 temporaries gone before the next piece
    starts), and the pieces give each variable's merge as a whole, against float64."""
    monkeypatch.setattr(penalty_lib, "MERGE_PIECE_FLOATS", 4)
    calls = []
    piece = penalty_lib._merge_piece
    monkeypatch.setattr(penalty_lib, "_merge_piece", lambda *args: calls.append(args[0].shape) or piece(*args))
    rng = np.random.default_rng(1)
    shapes = [(3, 5), (2,)]                      # 4 pieces (4 + 4 + 4 + 3 floats), then the whole
    a, mu, f, theta = ([rng.uniform(0, 1, s).astype(np.float32) for s in shapes] for _ in range(4))
    a_new, mu_new, dc, bad = penalty_lib.merge_all(*([tf.constant(x) for x in xs] for xs in (a, mu, f, theta)),
                                                   online, tf.constant(0.5, tf.float64))
    assert [tuple(s) for s in calls] == [(4,), (4,), (4,), (3,), (2,)]
    for j in range(len(shapes)):                # float64 NumPy, elementwise
        a64, mu64, f64, t64 = (np.float64(x[j]) for x in (a, mu, f, theta))
        want_a = 0.5 * a64 + f64 if online else a64 + f64
        want_mu = t64 if online else mu64 + f64 / want_a * (t64 - mu64)
        assert a_new[j].shape == shapes[j] and a_new[j].dtype == tf.float32
        np.testing.assert_allclose(a_new[j].numpy(), want_a, rtol=1e-6)
        np.testing.assert_allclose(mu_new[j].numpy(), want_mu, rtol=1e-6)
    want_dc = 0.0 if online else sum(float(np.sum(np.float64(a[j]) * f[j] / (np.float64(a[j]) + f[j])
                                                  * (np.float64(mu[j]) - theta[j]) ** 2)) for j in range(2))
    np.testing.assert_allclose(float(dc), want_dc, rtol=1e-12)
    assert not bad.numpy().any()
    f[0][2, 4], theta[1][0] = -1.0, np.nan      # flags from the last piece of the first variable
    _, _, _, bad = penalty_lib.merge_all(*([tf.constant(x) for x in xs] for xs in (a, mu, f, theta)),
                                         online, tf.constant(0.5, tf.float64))
    assert bad.numpy().tolist() == [[True, False], [False, True]]
