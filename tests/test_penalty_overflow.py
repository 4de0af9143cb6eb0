"""A penalty λ/2 Σ_i A_i (θ_i − μ_i)² that overflows float32 with a finite λ and a finite
state (issue 26 item 8) raises, naming the variable, instead of returning Inf or NaN into
training; a large value that float32 can hold is computed without an intermediate overflow
(λ·A is never formed, the ½ is inside the sums) and equals the float64 reference."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])


def ewc_with(m, fisher, anchors, lam, mode="separate"):
    """An EWC holding one task of diagonal Fisher ``fisher`` at ``anchors``."""
    ewc = fastewc.EWC(m, lam=lam, mode=mode)
    ewc.add_task([np.asarray(f, np.float32) for f in fisher], [np.asarray(a, np.float32) for a in anchors])
    return ewc


def reference(m, fisher, anchors, lam):
    """(value, grads) in float64 NumPy at the model's current (float32) weights."""
    thetas = [v.numpy().astype(np.float64) for v in m.trainable_variables]
    value = sum(0.5 * lam * np.sum(np.float64(f) * (t - np.float64(a)) ** 2)
                for t, f, a in zip(thetas, fisher, anchors))
    return value, [lam * np.float64(f) * (t - np.float64(a)) for t, f, a in zip(thetas, fisher, anchors)]


def penalty_calls(ewc, variables):
    return {
        "penalty": ewc.penalty,
        "penalty_and_gradients": lambda: ewc.penalty_and_gradients()[0],
        "functional": lambda: fastewc.ewc_penalty(variables, [ewc.state()[k][0] for k in ewc.tracked_paths],
                                                  [ewc.state()[k][1] for k in ewc.tracked_paths], ewc.lam),
    }


@pytest.mark.parametrize("call", ["penalty", "penalty_and_gradients", "functional"])
def test_overflowing_penalty_raises_naming_the_variable(call):
    m = model()
    kernel, bias = m.trainable_variables
    ewc = ewc_with(m, [np.full((3, 2), 1e30), np.zeros(2)], [np.zeros((3, 2)), np.zeros(2)], lam=1.0)
    kernel.assign(np.full((3, 2), 1e5, np.float32))              # λ/2 Σ A d² = 3e40
    with pytest.raises(FloatingPointError, match=r"EWC penalty .* is not finite in float32 \(inf\): variable "
                                                 r"'sequential.*/d/kernel': λ/2 Σ A \(θ − μ\)² = 3e\+40 goes beyond "
                                                 r"float32's largest value .*lam=1, A up to 1e\+30"):
        penalty_calls(ewc, m.trainable_variables)[call]()


def test_overflow_in_a_tf_function_raises_and_nan_weights_are_named():
    m = model()
    kernel, bias = m.trainable_variables
    ewc = ewc_with(m, [np.full((3, 2), 1e30), np.ones(2)], [np.zeros((3, 2)), np.zeros(2)], lam=1.0)
    kernel.assign(np.full((3, 2), 1e5, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"EWC penalty .* is not finite in float32.*in the order "
                                                            r"of \[.*/d/kernel.*/d/bias.*\]:\] \[0 1\]"):
        tf.function(ewc.penalty)()
    kernel.assign(np.zeros((3, 2), np.float32))
    bias.assign([np.nan, 0.0])
    with pytest.raises(FloatingPointError, match=r"variable 'sequential.*/d/bias': its weights θ are NaN or Inf"):
        ewc.penalty()


def test_shares_finite_but_their_sum_overflows():
    m = model()
    kernel, bias = m.trainable_variables
    ewc = ewc_with(m, [np.full((3, 2), 2e37), np.full(2, 6e37)], [np.zeros((3, 2)), np.zeros(2)], lam=1.0)
    kernel.assign(np.full((3, 2), 2.0, np.float32))             # shares 2.4e38 and 2.4e38
    bias.assign(np.full(2, 2.0, np.float32))
    with pytest.raises(FloatingPointError, match=r"every variable's share is finite.*their sum or the constant"):
        ewc.penalty()


@pytest.mark.parametrize("case", ["large_lam_near_anchor", "large_lam_at_anchor", "value_near_float32_max"])
def test_large_but_finite_penalty_matches_float64(case):
    """λ·A beyond float32 with θ − μ tiny (was Inf·d, or Inf·0 = NaN at the anchor), and a
    value in (max/2, max] (the doubled sum was Inf before the ½)."""
    m = model()
    kernel, bias = m.trainable_variables
    zeros = [np.zeros((3, 2)), np.zeros(2)]
    if case == "value_near_float32_max":
        lam, fisher, theta = 1.0, [np.full((3, 2), 8.5e37), np.zeros(2)], 1.0     # value 2.55e38
    else:
        lam, fisher = 3e38, [np.full((3, 2), 10.0), np.full(2, 10.0)]
        theta = 0.0 if case == "large_lam_at_anchor" else 1e-19
    ewc = ewc_with(m, fisher, zeros, lam=lam)
    kernel.assign(np.full((3, 2), theta, np.float32))
    bias.assign(np.zeros(2, np.float32))
    want_value, want_grads = reference(m, fisher, zeros, lam)
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    grads = tape.gradient(value, m.trainable_variables)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), want_value, rtol=1e-5, atol=0)
    for g, want in zip(grads, want_grads):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=0)
    for g, want in zip(ewc.penalty_gradients(), want_grads):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=0)


def test_kfac_overflow_names_the_layer():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                          keras.layers.Dense(2, name="d2")])
    rng = np.random.default_rng(0)
    ewc = fastewc.EWC(m, lam=1e30, curvature="kfac")
    ewc.consolidate((rng.normal(size=(6, 3)).astype(np.float32), np.arange(6) % 2), loss=LOSS)
    kernel = m.get_layer("d2").kernel
    kernel.assign(kernel + np.array([1e10, 0.0], np.float32))   # G's null space is (1, 1): softmax
    with pytest.raises(FloatingPointError, match=r"variable 'sequential.*/d2/kernel': its Kronecker quadratic .* "
                                                 r"goes beyond float32's largest value \(lam=1e\+30\)"):
        ewc.penalty()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_train_step_stopped_by_an_overflowing_penalty_names_the_variable(jit_compile):
    """A train step whose penalty overflows: with ``stop_on_nonfinite`` the step is not
    applied and the error names the penalty's variable (read again on the error path)."""
    m = model()
    kernel, _ = m.trainable_variables
    ewc = ewc_with(m, [np.full((3, 2), 1e30), np.zeros(2)], [np.zeros((3, 2)), np.zeros(2)], lam=1.0)
    kernel.assign(np.full((3, 2), 1e5, np.float32))
    before = [v.numpy().copy() for v in m.trainable_variables]
    step = fastewc.make_train_step(m, keras.optimizers.SGD(0.1), LOSS, ewc=ewc, jit_compile=jit_compile,
                                   stop_on_nonfinite=True)
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(FloatingPointError, match=r"training loss became non-finite .* not applied.* The EWC "
                                                 r"penalty is not finite at these weights: .*variable "
                                                 r"'sequential.*/d/kernel'"):
        step(x, y)
    for v, b in zip(m.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
