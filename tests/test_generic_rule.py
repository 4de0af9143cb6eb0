"""A layer without a factored rule costs that layer, not the model (fastewc.generic_rule).

The model: Dense → Gate → Dense, Gate a custom layer with no rule that owns a weight (a gate
vector), holds a Dense sublayer (which keeps its own rule) and takes a per-example second
argument.  The factored engine takes Gate's gate through the per-layer path and everything
else through the rules; the Fisher is checked against the float64 per-example oracle.
"""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import capture as capture_lib
from fastewc import generic_rule
from fastewc import testing as ft

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N, CLASSES = 6, 4


class Gate(keras.layers.Layer):
    """No rule: tanh(inner(x) ⊙ gate) ⊙ scale, ``scale`` (N, 1) per example."""

    def __init__(self, units=5, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, dtype=self.dtype_policy, name="inner")

    def build(self, shape):
        self.gate = self.add_weight(shape=(self.units,), initializer="random_normal", name="gate")
        self.inner.build(shape)

    def call(self, x, scale=None):
        return tf.tanh(self.inner(x) * self.gate) * scale

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,), name="x")
    scale = keras.Input((1,), name="scale")
    h = Gate(name="gate")(keras.layers.Dense(6, activation="relu")(x), scale=scale)
    return keras.Model({"x": x, "scale": scale}, keras.layers.Dense(CLASSES)(h))


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return ({"x": rng.normal(size=(N, 3)).astype("float32"),
             "scale": rng.uniform(0.5, 2.0, size=(N, 1)).astype("float32")},
            rng.integers(0, CLASSES, N))


def _assert_close(model, fisher, ref):
    for var, got, want in zip(model.trainable_variables, fisher, ref):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                                   atol=2e-5 * float(np.abs(want).max()), err_msg=var.path)


@pytest.mark.parametrize("kind,method,chunked,jit_compile", [
    ("empirical", "auto", False, False), ("exact", "factored", True, True)])
def test_ruleless_layer_alone_matches_float64(monkeypatch, kind, method, chunked, jit_compile):
    if chunked:       # a few pairs per vectorized chunk: the loop over chunks
        monkeypatch.setattr(generic_rule, "PAIR_FLOATS", 3 * 60)
    model = _model()
    x, y = _data()
    assert [layer.name for layer in capture_lib.layers_without_rule(model, fastewc.default_rules())] == ["gate"]
    with pytest.warns(UserWarning, match=r"no factored Fisher rule for 'gate' \(Gate\); the factored engine "
                                         r"takes its per-example gradients through tf.vectorized_map"):
        estimator = fastewc.FisherEstimator(model, loss=LOSS, kind=kind, method=method, jit_compile=jit_compile)
        fisher = estimator((x, y))
    assert estimator.plan((x, y)).method == "factored"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # once per estimator
        estimator((x, y))
    _assert_close(model, fisher, ft.reference_fisher_of(model, x, y, loss=LOSS, kind=kind))
