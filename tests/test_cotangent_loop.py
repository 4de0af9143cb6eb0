"""The factored engine's K backward passes in a ``tf.while_loop`` over the cotangents
(``FactoredEngine.loops_cotangents``): one backward pass in the graph, each block's sums
over the cotangents added per cotangent, a Kronecker block's A formed once outside.  The
exact kind (3 classes, K = 2 cotangents) against the float64 per-example references (diagonal, KFAC
factors, EKFAC second moments), the loop held to the unrolled / vectorized passes, and the
policy's choice read off the traced graph."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.engines import factored
from fastewc.engines.factored import FactoredEngine
from fastewc.testing import float64_twin, reference_fisher_of, reference_kronecker_factors

from conftest import assert_close
from test_ekfac import LOSS, data, mlp, oracle_s, per_example_gradients64


def _estimator(curvature, loop, batch_size=None, monkeypatch=None):
    if loop is not None:
        monkeypatch.setattr(FactoredEngine, "_loop", loop)
    return fastewc.FisherEstimator(mlp(), loss=LOSS, kind="exact", curvature=curvature, batch_size=batch_size,
                                   jit_compile=False)


def _loops(estimator, x, y):
    """Whether the traced batch functions of ``estimator`` run a while loop (the K passes)."""
    engine = estimator.plan((x, y)).engine
    ops = {op.type for concrete in engine._concrete.values() for op in concrete.graph.get_operations()}
    return bool(ops & {"While", "StatelessWhile"})


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_the_loop_matches_float64_and_the_k_passes(curvature, monkeypatch):
    """The loop's diagonal (7 examples in calls of 4: a padded last batch, the float64
    fold) and factors (4 examples, one call) against float64, and against the passes it
    replaces."""
    x, y = data(0) if curvature == "diagonal" else data(0, n=4)
    batch_size = 4 if curvature == "diagonal" else None
    looped = _estimator(curvature, True, batch_size, monkeypatch=monkeypatch)
    got = looped((x, y))
    assert _loops(looped, x, y)
    monkeypatch.setattr(FactoredEngine, "_loop", False)
    passes = _estimator(curvature, None, batch_size)
    want = passes((x, y))
    assert not _loops(passes, x, y)
    twin = float64_twin(looped.model)
    if curvature == "diagonal":
        for g, w, p in zip(got, reference_fisher_of(looped.model, x, y, loss=LOSS, kind="exact"), want):
            assert_close(g.numpy(), w, rtol=1e-4)
            np.testing.assert_allclose(g.numpy(), p.numpy(), rtol=1e-5, atol=1e-7)
        return
    reference = reference_kronecker_factors(twin, x, y, loss=LOSS, kind="exact")
    for block, twin_block in zip(got.blocks, want.blocks):
        a, g = reference[block.layer]
        assert_close(block.a, a)
        assert_close(block.g, g)
        np.testing.assert_allclose(block.a.numpy(), twin_block.a.numpy(), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(block.g.numpy(), twin_block.g.numpy(), rtol=1e-5, atol=1e-8)


def test_the_loop_forms_ekfac_second_moments_against_float64(monkeypatch):
    """EKFAC's second pass in the loop: S = (1/N) Σ_n Σ_y q(y|x_n) (U_Aᵀ ḡ U_G)² in the
    estimate's own bases, from float64 per-example gradients."""
    x, y = data(0, n=4)
    estimator = _estimator("ekfac", True, monkeypatch=monkeypatch)
    result = estimator((x, y))
    assert _loops(estimator, x, y)
    grads, n = per_example_gradients64(float64_twin(estimator.model), x, y, "exact")
    for block in result.blocks:
        s = oracle_s(grads[block.layer], n, block.u_a, block.u_g)
        np.testing.assert_allclose(block.s, s, rtol=1e-4, atol=1e-7 * s.max())


@pytest.mark.parametrize("floor_floats,loops", [(13, True), (14, False)])
def test_the_loop_is_chosen_where_one_rows_k_deltas_exceed_the_floors_floats(floor_floats, loops, monkeypatch):
    """The policy: loop where K · (probe floats of one row) > ``FLOOR_FLOATS`` (the MLP:
    K = 2 cotangents for its 3 classes, probes 4 + 3 floats a row: 14), else the K passes."""
    monkeypatch.setattr(factored, "FLOOR_FLOATS", floor_floats)
    x, y = data(0)
    estimator = fastewc.FisherEstimator(mlp(), loss=LOSS, kind="exact", jit_compile=False)
    got = estimator((x, y))
    assert _loops(estimator, x, y) is loops
    plan = estimator.plan((x, y))
    assert plan.engine.loops_cotangents(2, 7) is loops and not plan.engine.loops_cotangents(1, 10**9)
    for g, w in zip(got, reference_fisher_of(estimator.model, x, y, loss=LOSS, kind="exact")):
        assert_close(g.numpy(), w, rtol=1e-4)
