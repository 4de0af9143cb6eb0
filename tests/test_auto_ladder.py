"""``method="auto"`` walks factored -> vmap -> jacobian -> loop and never raises on a model
the eager per-example loop can handle: one test per rung, each against the float64
per-example oracle, each step down with one warning naming the layer and the method.
Also: a second call with a different number of examples on every per-example engine."""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.testing import reference_fisher_of

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@keras.saving.register_keras_serializable(package="test_auto_ladder")
class TanhCell(keras.layers.Layer):
    """A custom RNN cell: no rule, and pfor cannot vectorize the RNN's while loop inside
    vmap's per-example function (a TensorList variant); jacobian takes it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units))
        self.u = self.add_weight(shape=(self.units, self.units))

    def call(self, x, states):
        h = tf.tanh(x @ self.w + states[0] @ self.u)
        return h, [h]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="test_auto_ladder")
class EagerOnly(keras.layers.Layer):
    """A layer that reads a value on the host: it has no graph form, only the eager loop
    takes it."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def compute_output_shape(self, shape):
        return shape

    def call(self, x):
        return x * self.w / float(np.max(np.abs(np.asarray(x))))


def _mlp(middle):
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(5, activation="tanh")] + middle
                            + [keras.layers.Dense(4)])


def _shared():
    """A Dense layer called twice in one forward pass: the factored rules refuse it, vmap takes it."""
    x = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    return keras.Model(x, keras.layers.Dense(4)(shared(shared(keras.layers.Dense(5, activation="tanh")(x)))))


def _rnn():
    return keras.Sequential([keras.Input((4, 3)), keras.layers.RNN(TanhCell(4), name="rnn"), keras.layers.Dense(4)])


RUNGS = {
    "factored": (lambda: _mlp([]), (5,), []),
    "vmap": (_shared, (5,), ["'shared' (Dense) is called more than once"]),
    "jacobian": (_rnn, (4, 3), ["'rnn' (RNN)", "method='vmap' cannot vectorize"]),
    "loop": (lambda: _mlp([EagerOnly()]), (5,), ["method='vmap' could not trace",
                                                "method='jacobian' could not trace"]),
}


@pytest.mark.parametrize("rung", list(RUNGS))
def test_auto_takes_each_rung(rung):
    build, shape, expected = RUNGS[rung]
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6,) + shape).astype(np.float32)
    y = rng.integers(0, 4, 6)
    estimator = fastewc.FisherEstimator(model, loss=LOSS, kind="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = estimator((x, y))
        again = estimator((x[:3], y[:3]))               # the plan stays on its rung
    messages = [str(w.message) for w in caught if "fastewc" in str(w.message)]
    assert estimator.plan((x, y)).method == rung
    for text in expected:
        assert any(text in m for m in messages), (text, messages)
    if rung != "factored":
        assert any(f"method='auto' uses '{rung}'" in m for m in messages), messages
    assert len(messages) == len(set(messages))          # each step down warns once
    reference = reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-4, atol=1e-6 * np.max(np.abs(r)))
    reference = reference_fisher_of(model, x[:3], y[:3], loss=LOSS, kind="exact")
    for g, r in zip(again, reference):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-4, atol=1e-6 * np.max(np.abs(r)))


def test_explicit_method_does_not_step_down():
    keras.utils.set_random_seed(0)
    model = _mlp([EagerOnly()])
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    with pytest.raises(NotImplementedError, match="symbolic"):
        fastewc.fisher_diagonal(model, (x, np.arange(4) % 4), loss=LOSS, method="vmap")


@pytest.mark.parametrize("method,classes", [("jacobian", 5), ("vmap", 20)])
def test_new_example_counts_reuse_the_estimator(method, classes):
    """Per-example engines on 8, then 33 and 3 examples (the second concrete function
    is shape-relaxed: its batch dimension is unknown), exact kind: K = classes - 1, above
    the unrolled 16 for 20 classes."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(classes)])
    estimator = fastewc.FisherEstimator(model, loss=LOSS, kind="exact", method=method)
    rng = np.random.default_rng(0)
    for n in (8, 33, 3):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        y = rng.integers(0, classes, n)
        got = estimator((x, y))
        for g, r in zip(got, reference_fisher_of(model, x, y, loss=LOSS, kind="exact")):
            np.testing.assert_allclose(g.numpy(), r, rtol=1e-4, atol=1e-7 * np.max(np.abs(r)))


def test_onednn_broadcast_matmul_is_found_in_a_traced_graph():
    """The shapes oneDNN's batched matmul gets wrong (TF 2.21, x86): found by tracing only,
    never run here."""
    from fastewc import _keras_compat
    from fastewc.engines.per_example import onednn_broadcast_matmuls

    @tf.function(autograph=False)
    def f(a, b, c):
        return tf.matmul(a, b), tf.matmul(c, b)

    graph = f.get_concrete_function(tf.TensorSpec([8, 1, 10, 64]), tf.TensorSpec([64, 64]),
                                    tf.TensorSpec([8, 3, 10, 64])).graph
    found = onednn_broadcast_matmuls(graph)
    if _keras_compat.onednn_enabled():
        assert [op.inputs[0].shape.as_list() for op in found] == [[8, 1, 10, 64]]
    else:
        assert found == []


def _refusing_rule(layer, inputs, *args, **kwargs):
    raise fastewc.registry.UnsupportedLayerError(f"Layer '{layer.name}': refused by this test's rule.")


def test_keras_hub_transformer_under_vmap_never_runs_the_crashing_kernel():
    """keras_hub GPT-2 (tiny): explicit vmap without XLA raises instead of crashing the
    process; `auto` with a PositionEmbedding rule that refuses the layer steps down to jacobian, which agrees
    with factored (itself checked against float64 in tests/test_hub.py)."""
    keras_hub = pytest.importorskip("keras_hub")
    from fastewc import _keras_compat
    from fastewc.engines.per_example import UnsafeKernelError
    if not _keras_compat.onednn_enabled():
        pytest.skip("oneDNN is off: the kernel is not used")
    keras.utils.set_random_seed(0)
    length, n = 10, 8
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=100, num_layers=1, num_heads=2,
                                             hidden_dim=64, intermediate_dim=128, max_sequence_length=32)
    inputs = {"token_ids": keras.Input((length,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((length,), dtype="int32", name="padding_mask")}
    model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling1D()(backbone(inputs))))
    x = {"token_ids": np.random.default_rng(0).integers(0, 100, (n, length)).astype("int32"),
         "padding_mask": np.ones((n, length), "int32")}
    y = np.arange(n) % 5
    with pytest.raises(UnsafeKernelError, match="oneDNN"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOSS, method="vmap", jit_compile=False)
    rules = fastewc.default_rules().with_rule(keras_hub.layers.PositionEmbedding, _refusing_rule)
    estimator = fastewc.FisherEstimator(model, loss=LOSS, rules=rules, jit_compile=False)
    with pytest.warns(UserWarning, match="method='auto' uses 'jacobian'"):
        got = estimator((x, y))
    assert estimator.plan((x, y)).method == "jacobian"
    want = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, method="factored")
    scale = max(float(np.max(w.numpy())) for w in want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-7 * scale)
