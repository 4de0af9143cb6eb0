"""Misuse that Keras catches, caught here too (issue 16): probabilities passed as logits,
Embedding ids outside the table, the input structure or rank changing between calls, an
endless dataset, and errors that name the problem."""
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import data as data_lib

from conftest import data, mlp

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PROBS = keras.losses.SparseCategoricalCrossentropy()


def _fastewc_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("fastewc")]


# -- 1. probabilities passed as logits ------------------------------------------------------
@pytest.mark.parametrize("method", ["factored", "vmap"])
def test_softmax_output_with_from_logits_warns_once_and_reads_probabilities(method):
    model = mlp(out_activation="softmax")
    x, y = data()
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, method=method)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fisher = estimator((x, y))
        estimator((x[:7], y[:7]))                                 # a new plan: no new warning
    messages = _fastewc_warnings(record)
    assert len(messages) == 1, messages
    assert "SparseCategoricalCrossentropy has from_logits=True" in messages[0]
    assert re.search(r"layer '\w+', Dense\) comes from a softmax activation", messages[0]), messages[0]
    expected = fastewc.fisher_diagonal(model, (x, y), loss=PROBS, method=method)
    for f, e in zip(fisher, expected):
        np.testing.assert_allclose(f.numpy(), e.numpy(), rtol=1e-4, atol=1e-7)


def test_sigmoid_output_with_binary_from_logits_warns_naming_the_activation():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="sigmoid", name="probs")])
    x, _ = data()
    y = (np.random.default_rng(0).random((13, 3)) > 0.5).astype("float32")
    with pytest.warns(UserWarning, match=r"BinaryCrossentropy has from_logits=True, but the output of model "
                                         r"'.*' \(layer 'probs', Dense\) comes from a sigmoid activation"):
        fisher = fastewc.fisher_diagonal(model, (x, y), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                                         kind="exact")
    expected = fastewc.fisher_diagonal(model, (x, y), loss="binary_crossentropy", kind="exact")
    np.testing.assert_allclose(fisher[0].numpy(), expected[0].numpy(), rtol=1e-4, atol=1e-7)


def test_logits_output_with_from_logits_does_not_warn():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastewc.fisher_diagonal(mlp(), data(), loss=LOGITS)
    assert not _fastewc_warnings(record)


def test_train_step_warns_when_a_float16_cast_hides_the_softmax_from_keras():
    model = mlp(dtype="mixed_float16", out_activation="softmax")
    x, y = data()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.01), LOGITS)
    with pytest.warns(UserWarning, match=r"fastewc.TrainStep: `loss` SparseCategoricalCrossentropy has "
                                         r"from_logits=True, .*layer '\w+', Dense.* float16 .*softmax a second time"):
        step(x, y)
    # float32: Keras' own loss sees the activation and warns; fastewc adds nothing.
    step = fastewc.make_train_step(mlp(out_activation="softmax"), keras.optimizers.SGD(0.01), LOGITS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step(x, y)
    assert not _fastewc_warnings(record)
    assert any("does not represent logits" in str(w.message) for w in record)


# -- 2. Embedding ids outside the table ---------------------------------------------------------
def _embedding_model(name="tokens"):
    return keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3, name=name),
                             keras.layers.Flatten(), keras.layers.Dense(5)])


def _ids(bad=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (13, 4)).astype("int32")
    ids[3, 1] = bad
    return ids, rng.integers(0, 5, 13)


ID_ERROR = r"`{arg}` feeds layer 'tokens' \(Embedding, input_dim=10\) ids outside its table: ids must lie in " \
           r"\[0, 10\) .*Received: ids in \[0, 12\]"


@pytest.mark.parametrize("method,jit_compile", [("factored", True), ("factored", False), ("vmap", True),
                                                ("vmap", False), ("jacobian", False), ("loop", False)])
def test_embedding_ids_outside_the_table_raise_naming_the_layer(method, jit_compile):
    x, y = _ids()
    with pytest.raises(ValueError, match=ID_ERROR.format(arg="data")):
        fastewc.fisher_diagonal(_embedding_model(), (x, y), loss=LOGITS, method=method, jit_compile=jit_compile)


def test_embedding_ids_checked_in_a_later_batch_and_inside_a_subclassed_model():
    class Bag(keras.Model):
        def __init__(self):
            super().__init__()
            self.tokens = keras.layers.Embedding(10, 3, name="tokens")
            self.out = keras.layers.Dense(5)

        def call(self, x):
            return self.out(tf.reduce_mean(self.tokens(x + 0), axis=1))

    model = Bag()
    model(np.zeros((1, 4), "int32"))
    x, y = _ids()
    x[:, :] %= 10
    x[12, 0] = 12                                          # the last batch of 4
    with pytest.raises(ValueError, match=ID_ERROR.format(arg="data")):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, batch_size=4)


def test_negative_ids_count_from_the_end_as_in_keras():
    model = _embedding_model()
    x, y = _ids(bad=-1)
    wrapped = x.copy()
    wrapped[3, 1] = 9
    a = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)
    b = fastewc.fisher_diagonal(model, (wrapped, y), loss=LOGITS)
    for f, g in zip(a, b):
        np.testing.assert_allclose(f.numpy(), g.numpy(), rtol=1e-6)


def test_consolidate_and_train_step_refuse_ids_outside_the_table_and_change_nothing():
    model = _embedding_model()
    x, y = _ids()
    ewc = fastewc.EWC(model, lam=1.0)
    with pytest.raises(ValueError, match=ID_ERROR.format(arg="data")):
        ewc.consolidate((x, y), loss=LOGITS)
    assert ewc.num_tasks == 0
    before = [v.numpy().copy() for v in model.trainable_variables]
    for jit_compile in (True, False):
        step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOGITS, jit_compile=jit_compile)
        with pytest.raises(ValueError, match=ID_ERROR.format(arg="x")):
            step(x, y)
        with pytest.raises(ValueError, match=ID_ERROR.format(arg="x")), warnings.catch_warnings():
            warnings.simplefilter("ignore")                # Keras: "structure of `inputs` doesn't match"
            step([x], y)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    x[3, 1] = 9
    step(x, y)                                             # valid ids: it trains


def test_embedding_id_check_keeps_one_host_read_and_no_retrace():
    model = _embedding_model()
    x, y = _ids(bad=9)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS)
    estimator((x, y))
    traces = estimator.tracing_count()
    estimator((x, y))
    assert estimator.tracing_count() == traces
    state = estimator._initial_state(estimator.plan((x, y)).engine)
    assert state.checks.shape == (3 + 1,)             # range, finite, one count per Embedding


def test_embedding_guard_applies_to_its_own_thread_and_leaves_the_model_unchanged():
    import threading

    model = _embedding_model()
    x, y = _ids(bad=9)
    out = model(x).numpy()
    want = {m: fastewc.FisherEstimator(model, loss=LOGITS, method=m)((x, y)) for m in ("factored", "vmap", "loop")}
    barrier = threading.Barrier(4)
    results, errors = {}, []

    def fisher(method):
        try:
            estimator = fastewc.FisherEstimator(model, loss=LOGITS, method=method)
            barrier.wait()
            results[method] = [estimator((x, y)) for _ in range(2)]
        except Exception as err:          # noqa: BLE001 -- reported below
            errors.append(err)

    def predict():
        try:
            barrier.wait()
            for _ in range(20):
                np.testing.assert_allclose(model(x).numpy(), out, rtol=1e-6)
        except Exception as err:          # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=fisher, args=(m,)) for m in want] + [threading.Thread(target=predict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for method, calls in results.items():
        for got in calls:
            for g, w in zip(got, want[method]):
                np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6)
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers(include_self=True))


# -- 3. input structure changing between calls ----------------------------------------------------
def _two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = keras.layers.Dense(4)(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], out)


def test_input_structure_changing_between_calls_is_traced_once_per_structure():
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    y = rng.integers(0, 4, 8)
    forms = [(xa, xb), [xa, xb], {"a": xa, "b": xb}, (xa, xb)]
    model = _two_inputs()
    fishers = [fastewc.fisher_diagonal(model, (form, y), loss=LOGITS) for form in forms]
    for f in fishers[1:]:
        np.testing.assert_allclose(f[0].numpy(), fishers[0][0].numpy(), rtol=1e-6)
    step = fastewc.make_train_step(_two_inputs(), keras.optimizers.SGD(0.0), LOGITS)
    losses = [float(step(form, y)) for form in forms]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)
    assert step.tracing_count() == 3                       # tuple, list, dict; the tuple again: none


def test_x_then_a_list_of_x_works_in_fisher_and_train_step():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # Keras: "structure of `inputs` doesn't match"
        a = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)
        b = fastewc.fisher_diagonal(model, ([x], y), loss=LOGITS)
        step = fastewc.make_train_step(model, keras.optimizers.SGD(0.0), LOGITS)
        losses = [float(step(x, y)), float(step([x], y)), float(step(x, y))]
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)
    assert step.tracing_count() == 2


# -- 4. label / input rank changing between calls ----------------------------------------------------
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_train_step_label_rank_change_traces_once_per_rank(steps_per_call):
    model = mlp()
    x, y = data(n=8)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.0), LOGITS, steps_per_call=steps_per_call)
    stack = (lambda t: np.stack([t] * steps_per_call)) if steps_per_call > 1 else (lambda t: t)
    expected = float(LOGITS(y, model(x)))
    for labels in (y[:, None], y, y[:, None], y):
        np.testing.assert_allclose(np.asarray(step(stack(x), stack(labels))), expected, rtol=1e-5)
    assert step.tracing_count() == 2


def test_train_step_input_rank_change_traces_once_per_rank():
    class Flat(keras.Model):                               # accepts (n, 6) and (n, 2, 3)
        def __init__(self):
            super().__init__()
            self.out = keras.layers.Dense(5)

        def call(self, x):
            return self.out(tf.reshape(x, [-1, 6]))

    model = Flat()
    x, y = data(n=8)
    model(x)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.0), LOGITS)
    values = [float(step(t, y)) for t in (x, x.reshape(8, 2, 3), x, x.reshape(8, 2, 3))]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)
    assert step.tracing_count() == 2


# -- 5. an endless dataset -------------------------------------------------------------------
def _endless():
    x, y = data(n=12)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat().filter(lambda a, b: True)
    assert int(ds.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    return ds, x, y


def test_endless_dataset_is_read_up_to_max_examples():
    ds, x, y = _endless()
    model = mlp()
    fisher = fastewc.fisher_diagonal(model, ds, loss=LOGITS, max_examples=30)
    expected = fastewc.fisher_diagonal(model, (np.concatenate([x, x, x[:6]]), np.concatenate([y, y, y[:6]])),
                                       loss=LOGITS)
    for f, e in zip(fisher, expected):
        np.testing.assert_allclose(f.numpy(), e.numpy(), rtol=1e-5)
    forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    with pytest.raises(ValueError, match=r"infinite tf.data.Dataset .* or pass max_examples=n"):
        fastewc.fisher_diagonal(model, forever, loss=LOGITS)
    fastewc.fisher_diagonal(model, forever, loss=LOGITS, max_examples=5)
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, max_examples=5)
    expected = fastewc.fisher_diagonal(model, (x[:5], y[:5]), loss=LOGITS)
    np.testing.assert_allclose(fisher[0].numpy(), expected[0].numpy(), rtol=1e-6)


def test_endless_dataset_without_max_examples_stops_at_the_default_bound_and_warns(monkeypatch):
    monkeypatch.setattr(data_lib, "UNKNOWN_CARDINALITY_MAX_EXAMPLES", 20)
    ds, x, y = _endless()
    model = mlp()
    ewc = fastewc.EWC(model, lam=1.0)
    with pytest.warns(UserWarning, match=r"unknown cardinality .* read its first 20 examples, the default "
                                         r"bound, and it had more. Pass max_examples=n"):
        fisher = ewc.consolidate(ds, loss=LOGITS, kind="empirical")
    expected = fastewc.fisher_diagonal(model, (np.concatenate([x, x[:8]]), np.concatenate([y, y[:8]])),
                                       loss=LOGITS)
    np.testing.assert_allclose(fisher[0].numpy(), expected[0].numpy(), rtol=1e-5)
    fisher = ewc.consolidate(ds, loss=LOGITS, kind="empirical", max_examples=8)     # passthrough
    expected = fastewc.fisher_diagonal(model, (x[:8], y[:8]), loss=LOGITS)
    np.testing.assert_allclose(fisher[0].numpy(), expected[0].numpy(), rtol=1e-5)
    finite = tf.data.Dataset.from_generator(lambda: iter([(x, y)]), output_signature=(
        tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64)))
    with warnings.catch_warnings(record=True) as record:       # unknown but within the bound
        warnings.simplefilter("always")
        fastewc.fisher_diagonal(model, finite, loss=LOGITS)
    assert not _fastewc_warnings(record)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_max_examples_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"`max_examples` must be None or a positive integer. Received: max_examples="):
        fastewc.fisher_diagonal(mlp(), data(), loss=LOGITS, max_examples=value)


# -- 6. errors that name the problem --------------------------------------------------------------
def test_ragged_x_is_named_ragged():
    x = tf.ragged.constant([[1.0, 2.0, 3.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`data` inputs \(x\) must be dense arrays or tensors. Received: x as "
                                         r"a tf.RaggedTensor of shape \(2, None\) \(its rows have different "
                                         r"lengths\). Make it dense first, e.g. x.to_tensor\(\)"):
        fastewc.fisher_diagonal(mlp(d_in=3), (x, np.array([0, 1])), loss=LOGITS)


def test_nested_python_lists_are_named_lists():
    x = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]] * 3
    with pytest.raises(ValueError, match=r"`data` inputs \(x\) must be arrays .*Received: x as a Python list "
                                         r"whose items are numbers .*np.asarray\(x\)"):
        fastewc.fisher_diagonal(mlp(), (x, [0, 1, 2]), loss=LOGITS)
    fastewc.fisher_diagonal(mlp(), (np.asarray(x), [0, 1, 2]), loss=LOGITS)    # lists of labels are fine


@pytest.mark.parametrize("count", [2, 3])
def test_a_python_list_of_batches_is_named(count):
    x, y = data()
    batches = [(x[:5], y[:5]), (x[5:], y[5:]), (x, y)][:count]
    with pytest.raises(ValueError, match=r"`data` must be .*(a list of 2 \(x, y\) batches|a list of \(x, y\) "
                                         r"batches is not accepted)"):
        fastewc.fisher_diagonal(mlp(), batches, loss=LOGITS)
    with pytest.raises(ValueError, match=r"`data` labels \(y\) must be one array or tensor .*Received: y of "
                                         r"type tuple with 2 items"):
        fastewc.fisher_diagonal(mlp(), ((x[:5], y[:5]), (x[5:], y[5:])), loss=LOGITS)


def test_a_multi_output_model_is_refused_naming_its_outputs():
    inputs = keras.Input((6,))
    functional = keras.Model(inputs, [keras.layers.Dense(5)(inputs), keras.layers.Dense(2)(inputs)])

    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(5), keras.layers.Dense(2)

        def call(self, x):
            return self.a(x), self.b(x)

    subclassed = TwoHeads()
    subclassed(np.zeros((1, 6), "float32"))
    for model in (functional, subclassed):
        for method in ("auto", "vmap"):
            with pytest.raises(ValueError, match=r"`model` '.*' must have one output for a Fisher.*Received: a "
                                                 r"model with 2 outputs of shapes \[\(batch, 5\), \(batch, 2\)\]"):
                fastewc.fisher_diagonal(model, data(), loss=LOGITS, method=method)


@pytest.mark.parametrize("method", ["vmap", "loop", "factored"])
def test_float16_overflow_is_blamed_on_float16_for_every_engine(method):
    model = keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(64, dtype="mixed_float16") for _ in range(2)]
                             + [keras.layers.Dense(4, dtype="mixed_float16")])
    x = np.random.default_rng(0).random((3, 3)).astype("float32")
    y = np.array([0, 1, 2])
    if method != "factored":          # the per-example parameter gradients overflow in float16
        with pytest.raises(ValueError, match=r"is not finite .*the per-example gradients overflowed float16 "
                                             rf"\(largest value 65504\): method='{method}' forms them"):
            fastewc.fisher_diagonal(model, (x * 1e3, y), loss=LOGITS, method=method)
    else:                             # float32 products: fine at that scale
        fastewc.fisher_diagonal(model, (x * 1e3, y), loss=LOGITS, method=method)
    with pytest.raises(ValueError, match=r"is not finite .*the forward pass overflowed float16 \(largest value "
                                         r"65504\): the `model` outputs reached"):
        fastewc.fisher_diagonal(model, (x * 1e6, y), loss=LOGITS, method=method)
