"""capture.swapped_calls: the one mechanism that swaps layers' ``call`` (for the thread that
opened it, nested contexts restored as they were), used by capture and by the Embedding id
guard.  Checked against the layers' own outputs (NumPy) and with threads started and joined
inside the context (no timing)."""
import threading

import keras
import numpy as np
import pytest

import fastewc
from fastewc import capture as capture_lib
from fastewc.engines.base import IdGuard

from conftest import mlp

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _scaled(factor):
    return lambda previous: (lambda inputs, *a, **k: factor * previous(inputs, *a, **k))


def test_swapped_calls_apply_to_this_thread_only_and_nest():
    model = mlp()
    layer = model.layers[-1]
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    want = np.asarray(model(x))
    seen = {}

    def other():
        seen["other"] = np.asarray(model(x))

    with capture_lib.swapped_calls(model, [(layer, _scaled(2.0))]):
        np.testing.assert_allclose(np.asarray(model(x)), 2.0 * want, rtol=1e-6)
        with capture_lib.swapped_calls(model, [(layer, _scaled(3.0))]):    # wraps the outer swap
            np.testing.assert_allclose(np.asarray(model(x)), 6.0 * want, rtol=1e-6)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        np.testing.assert_allclose(np.asarray(model(x)), 2.0 * want, rtol=1e-6)   # the outer one is back
    np.testing.assert_allclose(seen["other"], want, rtol=1e-6)
    assert "call" not in layer.__dict__
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-6)


def _embedding_model():
    inputs = keras.Input((3,), dtype="int32")
    hidden = keras.layers.Embedding(5, 4, name="tok")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)))


def test_id_guard_outlives_a_capture_inside_it():
    """A capture inside the guard puts the guard's call back when it ends (it used to remove
    it, so later passes in the guard read ids outside the table unguarded)."""
    model = _embedding_model()
    good, bad = np.zeros((2, 3), "int32"), np.array([[0, 7, 1], [2, -9, 0]], "int32")
    with IdGuard(model) as guard:
        with capture_lib.capture(model, fastewc.default_rules()):
            model(good)
        model(bad)                                   # clamped, as XLA's gather would
        assert [float(c) for c in guard.counts()] == [2.0]
    assert all("call" not in layer.__dict__ for layer in model.layers)


@pytest.mark.parametrize("method", ["auto", "factored"])
def test_ids_outside_the_table_in_the_planning_example_raise_the_value_error(method):
    """The planning pass runs the first example through a capture inside the id guard; it
    used to raise TensorFlow's InvalidArgumentError instead of the documented error."""
    model = _embedding_model()
    x, y = np.zeros((4, 3), "int32"), np.zeros(4, "int64")
    x[0, 1] = 7
    with pytest.raises(ValueError, match=r"layer 'tok' \(Embedding, input_dim=5\) ids outside its table"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, method=method)
