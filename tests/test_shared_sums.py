"""The factored engine traces a rule's sums once per distinct layer signature
(fastewc.engines.shared_sums): identical layers call one traced function, checked on the
batch function's graph, and the sums still match a float64 reference."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.testing import float64_twin, reference_fisher, reference_kronecker_factors

from conftest import assert_close

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CALLS = ("PartitionedCall", "StatefulPartitionedCall")


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="c1"),
        keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="c2"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh", name="d0"),
        keras.layers.Dense(4, activation="tanh", name="d1"),
        keras.layers.Dense(4, activation="tanh", name="d2"),
        keras.layers.Dense(3, name="out"),
    ])


def _functions_called(graph, layer):
    """The names of the functions the ops under ``rules/<layer>/`` call."""
    return {op.get_attr("f").name for op in graph.get_operations()
            if op.type in CALLS and f"rules/{layer}/" in op.name}


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_identical_layers_share_one_traced_sums_function(curvature):
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 3, 2).astype(np.int32)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", curvature=curvature, method="factored",
                                        jit_compile=False)
    got = estimator((x, y))
    (concrete,) = estimator.plan((x, y)).engine._concrete.values()
    called = {name: _functions_called(concrete.graph, name) for name in ("c1", "c2", "d0", "d1", "d2", "out")}
    assert len(called["c1"]) == 1 and called["c1"] == called["c2"], called
    assert len(called["d1"]) == 1 and called["d1"] == called["d2"], called
    assert called["c1"] != called["d1"], called
    # A signature met once (d0: 32 inputs, not 4; out) is traced in place: no shared call.
    if curvature == "diagonal":
        assert called["d0"] == called["out"] == set(), called
    else:   # Kronecker blocks alone: the K passes unrolled, each layer's rule traced once and
        # called per cotangent (blocks.kronecker.per_cotangent_sums): a function of its own
        assert len(called["d0"]) == len(called["out"]) == 1 and called["d0"] != called["out"], called
        assert not (called["d0"] | called["out"]) & (called["c1"] | called["d1"]), called
    twin = float64_twin(model)
    if curvature == "diagonal":
        want = reference_fisher(twin, x, y, loss=LOGITS, kind="exact")
        for g, w in zip(got, want):
            assert_close(g, w)
    else:
        want = reference_kronecker_factors(twin, x, y, loss=LOGITS, kind="exact")
        assert sorted(b.layer for b in got.blocks) == sorted(want)
        for block in got.blocks:
            a, g = want[block.layer]
            assert_close(block.a, a)
            assert_close(block.g, g)


SCALE = {"d1": 1.0, "d2": 3.0}     # read by the rule below from outside its closure


def _scaled_dense_rule(layer, inputs, *args, **kwargs):
    """A user's rule whose sums read a global by the layer's name: two layers of one
    config get different sums, which a function traced for the first would not see."""
    from fastewc.rules.dense import dense_rule
    out = dense_rule(layer, inputs, *args, **kwargs)
    return out._replace(sum_sq=lambda delta, weight: [
        (v, SCALE.get(layer.name, 1.0) * s) for v, s in out.square_sums(delta, weight)])


def test_a_users_rule_is_not_shared():
    """Sharing is inferred from the rules' closures and the layer's config, which only
    fastewc's own rules are held to: a registered rule traces its sums per layer."""
    model = _model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 3, 2).astype(np.int32)
    rules = fastewc.default_rules().with_rule(keras.layers.Dense, _scaled_dense_rule)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", method="factored", jit_compile=False,
                                        rules=rules)
    got = estimator((x, y))
    want = reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="exact")
    for variable, g, w in zip(model.trainable_variables, got, want):
        layer = variable.path.split("/")[-2]
        assert_close(g, SCALE.get(layer, 1.0) * np.asarray(w))
