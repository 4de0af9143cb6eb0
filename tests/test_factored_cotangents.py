"""The factored engine's K backward passes: vectorized (one tf.vectorized_map over the
cotangents) by default, unrolled without XLA where a max pooling takes the mask route or
where the vectorized graph would run a batched matmul oneDNN gets wrong.  Each choice
against the float64 per-example oracle."""
import keras
import numpy as np
import pytest

import fastewc
from fastewc.engines import per_example
from fastewc.testing import reference_fisher_of

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
