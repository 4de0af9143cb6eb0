"""Property-based tests (hypothesis) over random small models, batches and tasks.

* fisher_diagonal: F >= 0, finite, float32, one tensor per trainable variable, whatever the
  model, loss, kind, method, weights and batch.
* EWC: the penalty is 0 at a single task's anchor, convex in the weights, equal to the sum
  of the per-task terms in separate mode, and independent of the order of the tasks.

Compiled functions are cached per model, so models come from a small pool (built once,
weights redrawn per example) to keep the file within about a minute on 2 shared cores.
"""
import functools

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastewc

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FAMILIES = {   # output head, loss, label kind
    "logits": (3, None, keras.losses.SparseCategoricalCrossentropy(from_logits=True), "ids"),
    "softmax": (3, "softmax", "sparse_categorical_crossentropy", "ids"),
    "sigmoid": (2, "sigmoid", "binary_crossentropy", "bits"),
    "gaussian": (2, None, "mse", "reals"),
}


@functools.lru_cache(maxsize=None)
def pooled_model(d_in, hidden, family):
    units, activation, _, _ = FAMILIES[family]
    layers = [keras.Input((d_in,))]
    layers += [keras.layers.Dense(h, activation="tanh" if i % 2 == 0 else "relu") for i, h in enumerate(hidden)]
    layers.append(keras.layers.Dense(units, activation=activation))
    return keras.Sequential(layers)


def redraw_weights(model, rng, scale):
    for v in model.trainable_variables:
        v.assign((scale * rng.normal(size=v.shape)).astype(np.float32))


def labels_for(family, rng, n):
    units, _, _, kind = FAMILIES[family]
    if kind == "ids":
        return rng.integers(0, units, size=n)
    if kind == "bits":
        return rng.integers(0, 2, size=(n, units)).astype(np.float32)
    return rng.normal(size=(n, units)).astype(np.float32)


@SETTINGS
@given(d_in=st.sampled_from([1, 3]), hidden=st.sampled_from([(), (4,), (3, 2)]),
       family=st.sampled_from(sorted(FAMILIES)), kind=st.sampled_from(["empirical", "sampled", "exact"]),
       method=st.sampled_from(["factored", "vmap", "loop"]), n=st.integers(1, 9), batch_size=st.integers(1, 8),
       weight_scale=st.floats(0.05, 3.0), x_scale=st.floats(0.0, 10.0), seed=st.integers(0, 2**31 - 1))
def test_fisher_is_finite_nonnegative_float32_of_the_variable_shapes(
        d_in, hidden, family, kind, method, n, batch_size, weight_scale, x_scale, seed):
    model = pooled_model(d_in, hidden, family)
    rng = np.random.default_rng(seed)
    redraw_weights(model, rng, weight_scale)
    x = (x_scale * rng.normal(size=(n, d_in))).astype(np.float32)
    y = labels_for(family, rng, n)
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=FAMILIES[family][2], kind=kind, method=method,
                                     batch_size=batch_size, num_samples=2, seed=seed % 1000,
                                     jit_compile=False)
    assert len(fisher) == len(model.trainable_variables)
    for f, v in zip(fisher, model.trainable_variables):
        assert f.dtype == tf.float32 and tuple(f.shape) == tuple(v.shape)
        values = f.numpy()
        assert np.all(np.isfinite(values)) and np.all(values >= 0.0)


# -- EWC ----------------------------------------------------------------------------------
EWC_POOL = [((3,), (4,)), ((2,), ()), ((5,), (2, 3))]      # (input shape, hidden widths)


@functools.lru_cache(maxsize=None)
def ewc_model(index):
    (d_in,), hidden = EWC_POOL[index]
    return keras.Sequential([keras.Input((d_in,))] + [keras.layers.Dense(h) for h in hidden]
                            + [keras.layers.Dense(2)])


def random_tasks(model, rng, num_tasks, zero_frac, log_scale, spread):
    """T tasks (F_t, θ_t): Fisher entries over a range of magnitudes, some exactly 0 in
    every task, and anchors spread around a common centre."""
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    dead = [rng.random(s) < zero_frac for s in shapes]
    centre = [rng.normal(size=s) for s in shapes]
    tasks = []
    for _ in range(num_tasks):
        fs = [np.where(d, 0.0, 10.0 ** (log_scale * rng.uniform(-1, 1, s))).astype(np.float32)
              for s, d in zip(shapes, dead)]
        anchors = [(c + spread * rng.normal(size=s)).astype(np.float32) for s, c in zip(shapes, centre)]
        tasks.append((fs, anchors))
    return tasks


def set_weights(model, values):
    for v, t in zip(model.trainable_variables, values):
        v.assign(np.asarray(t, np.float32))


def naive_value(thetas, tasks, lam):
    """Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)², float64."""
    return sum(0.5 * lam * np.sum(f.astype(np.float64) * (np.float64(t) - a.astype(np.float64)) ** 2)
               for fs, anchors in tasks for t, f, a in zip(thetas, fs, anchors))


def naive_grads(thetas, tasks, lam):
    return [sum(lam * f.astype(np.float64) * (np.float64(t) - a.astype(np.float64))
                for fs, anchors in tasks for f, a in [(fs[i], anchors[i])])
            for i, t in enumerate(thetas)]


def build_ewc(model, tasks, lam, mode="separate", gamma=1.0):
    ewc = fastewc.EWC(model, lam=lam, mode=mode, gamma=gamma)
    for fs, anchors in tasks:
        ewc.add_task(fs, anchors)
    return ewc


TASKS = dict(index=st.integers(0, len(EWC_POOL) - 1), zero_frac=st.floats(0.0, 1.0),
             log_scale=st.floats(0.0, 3.0), spread=st.floats(0.0, 3.0), lam=st.floats(0.0, 100.0),
             seed=st.integers(0, 2**31 - 1))


@SETTINGS
@given(mode=st.sampled_from(["separate", "online"]), gamma=st.floats(0.0, 1.0), **TASKS)
def test_penalty_is_zero_at_a_single_tasks_anchor(mode, gamma, index, zero_frac, log_scale, spread, lam, seed):
    model = ewc_model(index)
    rng = np.random.default_rng(seed)
    (fs, anchors), = random_tasks(model, rng, 1, zero_frac, log_scale, spread)
    ewc = build_ewc(model, [(fs, anchors)], lam, mode, gamma if mode == "online" else 1.0)
    set_weights(model, anchors)
    value, grads = ewc.penalty_and_gradients()
    assert value.dtype == tf.float32 and value.numpy() == 0.0
    assert all(np.all(g.numpy() == 0.0) for g in grads)


@SETTINGS
@given(num_tasks=st.integers(1, 4), mode=st.sampled_from(["separate", "online"]), gamma=st.floats(0.0, 1.0),
       t=st.floats(0.0, 1.0), **TASKS)
def test_penalty_is_convex_in_the_weights(num_tasks, mode, gamma, t, index, zero_frac, log_scale, spread, lam, seed):
    """P(t·a + (1−t)·b) <= t·P(a) + (1−t)·P(b) along random directions a → b."""
    model = ewc_model(index)
    rng = np.random.default_rng(seed)
    tasks = random_tasks(model, rng, num_tasks, zero_frac, log_scale, spread)
    ewc = build_ewc(model, tasks, lam, mode, gamma if mode == "online" else 1.0)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    a = [rng.normal(scale=2.0, size=s).astype(np.float32) for s in shapes]
    b = [rng.normal(scale=2.0, size=s).astype(np.float32) for s in shapes]
    mid = [np.float32(t) * p + np.float32(1.0 - t) * q for p, q in zip(a, b)]
    values = []
    for theta in (a, b, mid):
        set_weights(model, theta)
        value = float(ewc.penalty().numpy())
        assert np.isfinite(value) and value >= 0.0
        values.append(value)
    p_a, p_b, p_mid = values
    bound = t * p_a + (1.0 - t) * p_b
    assert p_mid <= bound + 1e-5 * max(p_a, p_b) + 1e-6


@SETTINGS
@given(num_tasks=st.integers(1, 5), **TASKS)
def test_separate_state_equals_the_sum_of_per_task_terms(num_tasks, index, zero_frac, log_scale, spread, lam, seed):
    model = ewc_model(index)
    rng = np.random.default_rng(seed)
    tasks = random_tasks(model, rng, num_tasks, zero_frac, log_scale, spread)
    ewc = build_ewc(model, tasks, lam)
    assert ewc.num_tasks == num_tasks
    assert ewc.state_bytes == 8 * sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    theta = [rng.normal(scale=2.0, size=v.shape).astype(np.float32) for v in model.trainable_variables]
    set_weights(model, theta)
    value, grads = ewc.penalty_and_gradients()
    want = naive_value(theta, tasks, lam)
    scale = naive_value(theta, [([np.abs(f) for f in fs], [np.zeros_like(a) for a in anchors])
                                for fs, anchors in tasks], lam) + naive_value(
        [np.zeros_like(t) for t in theta], tasks, lam)       # magnitude of the terms
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6 * scale + 1e-7)
    for g, w in zip(grads, naive_grads(theta, tasks, lam)):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5 * (np.max(np.abs(w)) + 1e-3))


@SETTINGS
@given(num_tasks=st.integers(2, 5), order=st.randoms(use_true_random=False), **TASKS)
def test_task_order_does_not_change_the_separate_penalty(num_tasks, order, index, zero_frac, log_scale,
                                                         spread, lam, seed):
    model = ewc_model(index)
    rng = np.random.default_rng(seed)
    tasks = random_tasks(model, rng, num_tasks, zero_frac, log_scale, spread)
    shuffled = list(tasks)
    order.shuffle(shuffled)
    first, second = build_ewc(model, tasks, lam), build_ewc(model, shuffled, lam)
    theta = [rng.normal(scale=2.0, size=v.shape).astype(np.float32) for v in model.trainable_variables]
    set_weights(model, theta)
    v1, g1 = first.penalty_and_gradients()
    v2, g2 = second.penalty_and_gradients()
    scale = abs(float(v1.numpy())) + 1e-6
    np.testing.assert_allclose(v2.numpy(), v1.numpy(), rtol=1e-5, atol=1e-6 * scale)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5 * (np.max(np.abs(a.numpy())) + 1e-3))
