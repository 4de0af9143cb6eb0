"""The block plan and the engines' named results (issue 25, the estimation half).

A plan says which block covers which variables (a Kronecker block per Dense kernel with
its bias under curvature='kfac', a diagonal block for every other variable); an engine,
built with it, returns one batch's sums by block (``BatchSums``), checked here against
float64 NumPy on a Dense → LayerNormalization → Dense model with the unit Gaussian
likelihood (ℓ = ½‖y − o‖², so δ_o = o − y for the empirical kind)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import blocks
from fastewc.engines.base import BatchSums, Checks

from conftest import assert_close

EPS = 1e-3       # LayerNormalization's default epsilon


def _problem():
    rng = np.random.default_rng(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"),
                              keras.layers.LayerNormalization(name="ln", epsilon=EPS),
                              keras.layers.Dense(2, name="d2")])
    ln = model.get_layer("ln")
    ln.gamma.assign(rng.normal(size=4).astype("float32"))
    ln.beta.assign(rng.normal(size=4).astype("float32"))
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    return model, x, y


def _reference(model, x, y):
    """float64 batch sums (Σ over the 5 examples) of the last Dense's factors, the first
    Dense's A and the LayerNormalization's squared gradients."""
    w1, b1, gamma, beta, w2, b2 = [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]
    x = x.astype(np.float64)
    h = x @ w1 + b1
    xhat = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + EPS)
    z = gamma * xhat + beta
    delta = z @ w2 + b2 - y                       # ∂ℓ/∂o
    dz = delta @ w2.T                             # ∂ℓ/∂z
    ones = np.ones((len(x), 1))
    a1, a2 = np.hstack([x, ones]), np.hstack([z, ones])
    return {"a1": a1.T @ a1, "a2": a2.T @ a2, "g2": delta.T @ delta,
            "gamma": np.sum((dz * xhat) ** 2, 0), "beta": np.sum(dz ** 2, 0)}


def _batch_sums(estimator, x, y):
    plan = estimator.plan((x, y))
    mask = tf.ones([len(x)], tf.float32)
    return plan, plan.engine.batch_sums(tf.constant(x), tf.constant(y), mask, tf.zeros([0]))


def test_kfac_plan_gives_each_dense_a_kronecker_block_and_the_rest_diagonals():
    model, x, y = _problem()
    estimator = fastewc.FisherEstimator(model, loss="mse", curvature="kfac")
    plan, batch = _batch_sums(estimator, x, y)
    w1, b1, gamma, beta, w2, b2 = model.trainable_variables
    assert plan.engine.blocks is plan.blocks                       # given at construction
    assert [(b.kind, b.variables) for b in plan.blocks.blocks] == [
        ("kfac", (w1, b1)), ("diagonal", (gamma,)), ("diagonal", (beta,)), ("kfac", (w2, b2))]
    assert plan.blocks.shapes == [(4, 4), (4, 4), (4,), (4,), (5, 5), (2, 2)]
    assert isinstance(batch, BatchSums) and batch.bad_ids == []
    ref = _reference(model, x, y)
    (a1, _), (sq_gamma,), (sq_beta,), (a2, g2) = batch.sums
    assert_close(a1, ref["a1"], rtol=1e-5)
    assert_close(a2, ref["a2"], rtol=1e-5)
    assert_close(g2, ref["g2"], rtol=1e-5)
    assert_close(sq_gamma, ref["gamma"], rtol=1e-4)
    assert_close(sq_beta, ref["beta"], rtol=1e-4)
    out = np.asarray(model(x))
    assert_close(batch.output_range, [out.min(), out.max()], rtol=1e-6)


@pytest.mark.parametrize("method", ["factored", "vmap"])
def test_diagonal_plan_gives_one_diagonal_block_per_variable(method):
    model, x, y = _problem()
    estimator = fastewc.FisherEstimator(model, loss="mse", method=method)
    plan, batch = _batch_sums(estimator, x, y)
    assert [b.variables for b in plan.blocks.blocks] == [(v,) for v in model.trainable_variables]
    ref = _reference(model, x, y)
    assert_close(batch.sums[2][0], ref["gamma"], rtol=1e-4)
    assert_close(batch.sums[3][0], ref["beta"], rtol=1e-4)


def test_a_call_reads_named_checks():
    model, x, y = _problem()
    estimator = fastewc.FisherEstimator(model, loss="mse", curvature="kfac")
    plan = estimator.plan((x, y))
    checks = Checks.read(estimator._initial_state(plan.engine).checks)
    assert checks.bad_ids.shape == (0,) and checks.finite and tuple(checks.output_range) == (np.inf, -np.inf)
    fisher = estimator((x, y))
    ref = _reference(model, x, y)
    assert isinstance(fisher, fastewc.KroneckerFisher)
    assert_close(fisher.blocks[1].a, ref["a2"] / len(x), rtol=1e-5)
    assert_close(fisher.diagonal[2], ref["gamma"] / len(x), rtol=1e-4)
    assert fisher.diagonal[0] is None and fisher.diagonal[5] is None


def test_the_kinds_are_the_curvatures():
    from fastewc.curvature import CURVATURES
    assert tuple(blocks.KINDS) == CURVATURES
    assert blocks.KINDS["kfac"].rules_only and not blocks.KINDS["diagonal"].rules_only
