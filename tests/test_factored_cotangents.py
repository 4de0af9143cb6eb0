"""The factored engine's K backward passes: vectorized (one tf.vectorized_map over the
cotangents) by default, unrolled without XLA where a max pooling takes the mask route,
where every block takes the K passes' deltas apart (Kronecker blocks alone) or where the
vectorized graph would run a batched matmul oneDNN gets wrong.  Each choice against the
float64 per-example oracle."""
import keras
import numpy as np
import pytest

import fastewc
from fastewc.engines import per_example
from fastewc.testing import float64_twin, reference_fisher_of, reference_kronecker_factors

from conftest import assert_close

L = keras.layers
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _problem(pool):
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", activation="tanh")(inp)
    h = L.MaxPooling2D(2)(h) if pool else L.DepthwiseConv2D(3, strides=2, padding="same")(h)
    model = keras.Model(inp, L.Dense(5)(L.Flatten()(h)))
    rng = np.random.default_rng(4)
    return model, rng.normal(size=(6, 6, 6, 2)).astype(np.float32), rng.integers(0, 5, size=6)


def _fisher_and_engine(model, x, y):
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", method="factored",
                                        batch_size=4, jit_compile=False)
    return estimator((x, y)), estimator.plan((x, y)).engine


def _assert_matches_reference(model, x, y, got):
    want = reference_fisher_of(model, x, y, loss=LOGITS, kind="exact", batch_size=4)
    for g, w in zip(got, want):
        assert_close(g.numpy(), w, rtol=1e-4)


@pytest.mark.parametrize("pool,unrolled", [(False, False), (True, True)],
                         ids=["vectorized", "max-pool-unrolled"])
def test_cotangents_vectorized_unless_a_max_pool_takes_the_mask_route(pool, unrolled):
    model, x, y = _problem(pool)
    got, engine = _fisher_and_engine(model, x, y)
    assert engine.unroll_cotangents is unrolled
    _assert_matches_reference(model, x, y, got)


def test_a_graph_with_a_matmul_onednn_gets_wrong_is_traced_again_unrolled(monkeypatch):
    model, x, y = _problem(pool=False)
    flagged = []

    def risky_once(graph):
        flagged.append(graph)
        return ["a BatchMatMulV2"] if len(flagged) == 1 else []

    monkeypatch.setattr(per_example, "onednn_broadcast_matmuls", risky_once)
    got, engine = _fisher_and_engine(model, x, y)
    assert engine.unroll_cotangents is True
    assert len(flagged) == 1                      # the unrolled graph is not checked again
    _assert_matches_reference(model, x, y, got)


@pytest.mark.parametrize("jit", [False, True])
def test_a_plan_of_kronecker_blocks_alone_unrolls_its_passes_without_xla(jit):
    """An MLP's exact KFAC (every block Kronecker: each layer's G one matmul per cotangent)
    runs the K = 5 backward passes unrolled without XLA (vectorized under XLA, and for the
    diagonal of the same model), with its factors against the float64 oracle."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((7,)), L.Dense(6, activation="tanh"), L.Dense(5)])
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 7)).astype(np.float32), rng.integers(0, 5, size=6)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", curvature="kfac",
                                        batch_size=8, jit_compile=jit)
    engine = estimator.plan((x, y)).engine
    assert engine.unroll_cotangents is not jit
    got = estimator((x, y))
    assert engine._vectorized is jit
    reference = reference_kronecker_factors(float64_twin(model), x, y, loss=LOGITS, kind="exact")
    for block in got.blocks:
        a, g = reference[block.layer]
        np.testing.assert_allclose(block.a.numpy(), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.g.numpy(), g, rtol=1e-5, atol=1e-7)
    diagonal = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", batch_size=8, jit_compile=False)
    assert diagonal.plan((x, y)).engine.unroll_cotangents is False
