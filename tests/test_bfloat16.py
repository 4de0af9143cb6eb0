"""``mixed_bfloat16`` models (issue 24 item 5): the Fisher, the EWC penalty and its gradient
in a train step, against float64 NumPy.

* The Fisher of a bfloat16-computing MLP matches float64 NumPy of the same maths on the
  bfloat16-rounded inputs, weights and activations to bfloat16's precision (8 significant
  bits: relative errors ~2⁻⁸ from the backward pass, which the reference does not round),
  and tiny values (inputs of 1e-15: a first-layer Fisher of ~1e-31) neither vanish nor lose
  more than that: bfloat16 has float32's exponent range.
* The EWC state is float32 and so are the penalty and its gradient: equal to float64 NumPy
  to float32 precision, also where A spans 1e-30 to 1e30, and the gradient reaches the
  update of ``make_train_step`` and ``EWCModel.fit`` unrounded (a bfloat16 cast on its way
  would move it by up to 2⁻⁹ relative; the test resolves 1e-4).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAM = 0.5


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
                             keras.layers.Dense(4, name="out")])


def bf16(a):
    """``a`` rounded to bfloat16 (to nearest even, as TensorFlow casts), as float64."""
    return tf.cast(tf.cast(np.asarray(a, np.float32), tf.bfloat16), tf.float64).numpy()


def reference_fisher(weights, x, y):
    """The empirical Fisher diagonal, mean over examples of the squared per-example gradient
    of the cross-entropy, in float64, the forward pass rounded to bfloat16 where a
    ``mixed_bfloat16`` Dense rounds it (inputs, kernels, biases, each layer's output)."""
    w1, b1, w2, b2 = (bf16(w) for w in weights)
    xr = bf16(x)
    h = bf16(np.tanh(bf16(bf16(xr @ w1) + b1)))
    z = bf16(bf16(h @ w2) + b2)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d2 = p - np.eye(4)[y]                           # ∂ loss_n / ∂ z
    d1 = (d2 @ w2.T) * (1.0 - h ** 2)               # ∂ loss_n / ∂ (x W1 + b1)
    grads = [xr[:, :, None] * d1[:, None, :], d1, h[:, :, None] * d2[:, None, :], d2]
    return [np.mean(g ** 2, axis=0) for g in grads]


@pytest.mark.parametrize("scale", [1.0, 1e-15])
def test_bfloat16_fisher_matches_float64_on_rounded_values(bfloat16_policy, scale):
    model = mlp()
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 6)) * scale).astype(np.float32)
    y = rng.integers(0, 4, 64)
    want = reference_fisher(model.get_weights(), x, y)
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="empirical")
    for g, w in zip(got, want):
        assert g.dtype == tf.float32
        g = g.numpy().astype(np.float64)
        assert np.all(np.isfinite(g)) and np.all(g > 0)            # nothing vanished
        assert np.linalg.norm(g - w) / np.linalg.norm(w) <= 2e-2
        np.testing.assert_allclose(g, w, rtol=6e-2)


def _penalized(model, exponents, spread):
    """An EWC on ``model`` with A log-uniform over 10^``exponents`` and μ = θ + ``spread``·N(0, 1)."""
    rng = np.random.default_rng(1)
    ewc = fastewc.EWC(model, lam=LAM)
    fisher = [(10.0 ** rng.uniform(*exponents, v.shape)).astype(np.float32) for v in model.trainable_variables]
    anchors = [v.numpy() + rng.normal(size=v.shape).astype(np.float32) * spread for v in model.trainable_variables]
    ewc.add_task(fisher, anchors)
    a, mu = zip(*ewc.state().values())
    return ewc, [x.astype(np.float64) for x in a], [x.astype(np.float64) for x in mu]


def test_bfloat16_penalty_and_gradient_match_float64(bfloat16_policy):
    model = mlp()
    ewc, a, mu = _penalized(model, (-30, 30), 1e-3)     # λ·A·(θ − μ) from ~1e-33 to ~1e27
    theta = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    value, grads = ewc.penalty_and_gradients()
    want = 0.5 * LAM * sum(np.sum(f * (t - m) ** 2) for f, t, m in zip(a, theta, mu))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert value.dtype == tf.float32
    for g, f, t, m in zip(grads, a, theta, mu):
        assert g.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), LAM * f * (t - m), rtol=1e-5)


@pytest.mark.parametrize("trainer", ["make_train_step", "EWCModel.fit"])
def test_bfloat16_train_step_applies_the_float32_penalty_gradient(bfloat16_policy, trainer):
    """Data loss weighted 0 (its gradient exactly 0): one SGD step moves θ by
    −lr·λ·A·(θ − μ), which float64 NumPy gives to float32 precision."""
    model = mlp()
    ewc, a, mu = _penalized(model, (-1, 1), 1.0)
    theta = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    y = rng.integers(0, 4, 4)
    zero = np.zeros(4, np.float32)
    lr = 0.1
    if trainer == "make_train_step":
        step = fastewc.make_train_step(model, keras.optimizers.SGD(lr), LOGITS, ewc=ewc)
        step(x, y, zero)
    else:
        wrapped = fastewc.EWCModel(model, ewc)
        wrapped.compile(optimizer=keras.optimizers.SGD(lr), loss=LOGITS)
        wrapped.fit(x, y, sample_weight=zero, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for v, f, t, m in zip(model.trainable_variables, a, theta, mu):
        moved = t - v.numpy().astype(np.float64)
        want = lr * LAM * f * (t - m)
        big = np.abs(want) > 1e-2 * np.abs(t)      # steps θ's float32 ulp moves < 1e-5 relative
        assert big.mean() > 0.5
        np.testing.assert_allclose(moved[big], want[big], rtol=1e-4)
