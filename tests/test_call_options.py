"""Calling the compiled Fisher functions without Grappler (fastewc._keras_compat.
without_graph_optimizer, fastewc._policy.skip_graph_optimizer): per thread, restored, and
the Fisher unchanged."""
import threading

import keras
import numpy as np
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.eager import context as tf_context

import fastewc
from fastewc import _keras_compat as compat
from fastewc import _policy
from fastewc.testing import reference_fisher_of

from conftest import assert_close

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _meta_optimizer_disabled():
    config = config_pb2.ConfigProto()
    config.ParseFromString(tf_context.context().function_call_options.config_proto_serialized or b"")
    return config.graph_options.rewrite_options.disable_meta_optimizer


def test_without_graph_optimizer_is_per_thread_and_restored():
    before = tf_context.context().function_call_options
    seen = {}
    with compat.without_graph_optimizer():
        seen["inside"] = _meta_optimizer_disabled()
        other = threading.Thread(target=lambda: seen.update(other=_meta_optimizer_disabled()))
        other.start()
        other.join()
    assert seen == {"inside": True, "other": False}
    assert tf_context.context().function_call_options is before and not _meta_optimizer_disabled()


def test_fisher_called_without_graph_optimizer_matches_reference(monkeypatch):
    monkeypatch.setattr(_policy, "GRAPH_OPTIMIZER_MAX_OPS", 0)       # every graph skips it
    monkeypatch.setattr(_policy, "_HAS_GPU", False)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(4)])
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 5)).astype(np.float32), rng.integers(0, 4, size=9)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", batch_size=4)
    got = estimator((x, y))
    engine = estimator.plan((x, y)).engine
    assert engine._unoptimized and all(engine._unoptimized.values())
    want = reference_fisher_of(model, x, y, loss=LOGITS, kind="exact", batch_size=4)
    for g, w in zip(got, want):
        assert_close(g.numpy(), w, rtol=1e-4)


def test_the_graph_size_counts_a_nested_function_once_per_call(monkeypatch):
    """A nested tf.function is inlined at instantiation, once per call: a graph calling a
    body of B ops three times is instantiated with 2 · (B + 1) more ops than one calling it
    once (two more call ops, two more bodies), though its library holds the body once; and
    whether Grappler is skipped follows that count."""
    import tensorflow as tf

    def body(t):
        return tf.tanh(t * 2.0 + 1.0)

    def outer(calls):
        inner = tf.function(body, autograph=False).get_concrete_function(tf.TensorSpec([3], tf.float32))

        def f(t):
            for _ in range(calls):
                t = inner(t)
            return t
        return tf.function(f, autograph=False).get_concrete_function(tf.TensorSpec([3], tf.float32)).graph

    once, thrice = outer(1), outer(3)
    size = len(tf.function(body, autograph=False).get_concrete_function(
        tf.TensorSpec([3], tf.float32)).graph.get_operations())
    assert len(compat.graph_operations(thrice)) - len(compat.graph_operations(once)) == 2   # the call ops
    assert compat.instantiated_operation_count(thrice) - compat.instantiated_operation_count(once) == 2 * (size + 1)
    monkeypatch.setattr(_policy, "GRAPH_OPTIMIZER_MAX_OPS", len(compat.graph_operations(thrice)))
    monkeypatch.setattr(_policy, "_HAS_GPU", False)
    assert _policy.skip_graph_optimizer(thrice)
