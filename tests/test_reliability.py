"""Reliability of the Fisher and EWC entry points (issue 8): bad input, numerical safety,
no lost state.

Bad arguments that tests/test_fisher_errors.py and tests/test_ewc.py already cover (unknown
kind/method/loss/mode, labels out of range, one-hot vs sparse, empty data, x/y lengths,
unbuilt model, no trainable variables, batch_size/lam/gamma, save/load corruption and
checksum) are not repeated here.  docs/errors.md lists them all.
"""
import glob
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import ewc_file as ewc_file_lib
from fastewc.engines import Engine
from fastewc.testing import reference_fisher

from conftest import data, mlp

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BCE_LOGITS = keras.losses.BinaryCrossentropy(from_logits=True)
SPARSE = "sparse_categorical_crossentropy"


def fisher(model, xy, **kwargs):
    kwargs = {"loss": LOGITS, "jit_compile": False, **kwargs}
    return fastewc.fisher_diagonal(model, xy, **kwargs)


def assert_same(got, want, rtol=0.0, atol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == tf.float32 and g.shape == w.shape
        if rtol == 0.0 and atol == 0.0:
            np.testing.assert_array_equal(g.numpy(), np.asarray(w))
        else:
            np.testing.assert_allclose(g.numpy(), np.asarray(w), rtol=rtol, atol=atol)


def assert_finite_nonnegative(fishers):
    for f in fishers:
        assert f.dtype == tf.float32
        assert bool(tf.reduce_all(tf.math.is_finite(f))) and bool(tf.reduce_all(f >= 0))


class Sub(keras.Model):
    """A subclassed model: no declared Input, so no declared input dtype or shape."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(7, activation="tanh")
        self.out = keras.layers.Dense(5)

    def call(self, x):
        return self.out(self.hidden(x))


def subclassed():
    model = Sub()
    model(np.zeros((1, 6), np.float32))
    return model


# -- inputs: dtypes -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["factored", "vmap"])
def test_float64_float16_integer_and_bool_inputs_are_cast_like_keras(method):
    """Keras' fit/predict cast inputs to the model's Input dtype: so does fisher_diagonal
    (the same values give the same Fisher, bit for bit)."""
    model = mlp()
    x, y = data()
    ids = np.round(3 * x)
    want = fisher(model, (ids.astype(np.float32), y), method=method, kind="exact")
    for dtype in (np.float64, np.float16, np.int32, np.int64, np.int16):
        assert_same(fisher(model, (ids.astype(dtype), y), method=method, kind="exact"), want)
    mask = x > 0
    assert_same(fisher(model, (mask, y), method=method),
                fisher(model, (mask.astype(np.float32), y), method=method))


def test_declared_integer_input_gets_integer_ids():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(10, 3)(inp))
    model = keras.Model(inp, keras.layers.Dense(5)(h))
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, 10, size=(9, 4)), rng.integers(0, 5, size=9)
    want = fisher(model, (ids.astype(np.int32), y), method="vmap")
    assert_same(fisher(model, (ids.astype(np.float64), y), method="vmap"), want)
    assert_same(fisher(model, (ids.astype(np.int64), y), method="vmap"), want)
    # Embedding gradients are IndexedSlices: the per-example methods densify them.  Oracle:
    # the same model with the lookup written as one_hot(ids) @ E (dense gradients), float64.
    twin_in = keras.Input((4,), dtype="int32")
    one_hot = keras.layers.Lambda(lambda t: keras.ops.one_hot(t, 10, dtype="float64"))(twin_in)
    h64 = keras.layers.Flatten(dtype="float64")(keras.layers.Dense(3, use_bias=False, dtype="float64")(one_hot))
    twin = keras.Model(twin_in, keras.layers.Dense(5, dtype="float64")(h64))
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    reference = reference_fisher(twin, ids, y, loss=LOGITS)
    for method in ("factored", "vmap", "loop", "jacobian"):
        assert_same(fisher(model, (ids, y), method=method), reference, rtol=1e-5, atol=1e-9)


def test_subclassed_model_inputs():
    """No declared Input: floats of another precision go to floatx (as Keras' data adapters
    do); integers pass unchanged, which the model may or may not accept."""
    model = subclassed()
    x, y = data()
    ids = np.round(3 * x)
    want = fisher(model, (ids.astype(np.float32), y), method="vmap")
    assert_same(fisher(model, (ids.astype(np.float64), y), method="vmap"), want)
    assert_same(fisher(model, (ids.astype(np.int32), y), method="vmap"), want, rtol=1e-6)
    with pytest.raises(TypeError, match=r"`data` inputs of dtype \['int32'\] could not go through model "
                                        r"'sub.*' with method='factored'.*cast x to float"):
        fisher(model, (ids.astype(np.int32), y), method="factored")


@pytest.mark.parametrize("dtype", [str, np.complex64])
def test_non_numeric_inputs_raise_a_type_error(dtype):
    x, y = data()
    for model in (mlp(), subclassed()):
        with pytest.raises(TypeError, match=r"`data` inputs must be real numbers .* Received: x of dtype "
                                            r"(string|complex64)"):
            fisher(model, (x.astype(dtype), y))


# -- inputs: shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("slicer, received", [
    (lambda x: x[:, :3], r"\(3,\)"),
    (lambda x: x[:, 0], r"\(\)"),
    (lambda x: x[:, :, None, None], r"\(6, 1, 1\)"),
])
def test_input_shape_mismatch_names_data_and_the_shapes(slicer, received):
    x, y = data()
    with pytest.raises(ValueError, match=r"`data` inputs do not fit model '.*': expected x with per-example "
                                         r"shape \(6,\) \(model input shape \(None, 6\)\). Received: x with "
                                         rf"per-example shape {received}"):
        fisher(mlp(), (slicer(x), y))


def test_input_shape_mismatch_for_a_subclassed_model():
    x, y = data()
    with pytest.raises(ValueError, match=r"`data` inputs do not fit model 'sub.*'. Received: x with per-example "
                                         r"shapes \[\(3,\)\]"):
        fisher(subclassed(), (x[:, :3], y))


def test_a_trailing_unit_axis_is_squeezed_and_ranks_never_relax_to_unknown():
    """Keras squeezes x of shape (N, 6, 1) for an Input of (6,).  Alternating ranks must not
    make the cached compiled function relax x to an unknown rank, which Keras rejects."""
    model = mlp()
    x, y = data()
    want = fisher(model, (x, y))
    for xx in (x[:, :, None], x, x[:, :, None]):
        assert_same(fisher(model, (xx, y)), want)


def test_datasets_of_single_examples_ask_for_batch():
    x, y = data()
    with pytest.raises(ValueError, match=r"with a leading batch dimension \(call .batch\(n\)"):
        fisher(mlp(), tf.data.Dataset.from_tensor_slices((x, y)))        # y scalars
    one_hot = np.eye(5, dtype=np.float32)[y]
    with pytest.raises(ValueError, match=r"`data` inputs do not fit .*A tf.data.Dataset must yield batches: "
                                         r"call .batch\(n\)"):
        fisher(mlp(), tf.data.Dataset.from_tensor_slices((x, one_hot)), loss="categorical_crossentropy")


def test_infinite_and_unknown_rank_datasets_raise():
    x, y = data()
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(ValueError, match=r"`data` is an infinite tf.data.Dataset.*take\(n\).*cardinality=INFINITE"):
        fisher(mlp(), batched.repeat())
    unshaped = tf.data.Dataset.from_generator(
        lambda: iter([(x, y)]), output_signature=(tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.int64)))
    with pytest.raises(ValueError, match=r"leading batch dimension .*shaped output_signature"):
        fisher(mlp(), unshaped)


# -- labels -------------------------------------------------------------------------------
def test_label_dtypes():
    model = mlp()
    x, y = data()
    want = fisher(model, (x, y))
    for labels in (y.astype(np.float32), y.astype(np.float64), y.astype(np.uint8), y[:, None]):
        assert_same(fisher(model, (x, labels)), want)
    with pytest.raises(TypeError, match=r"`data` labels \(y\) must be real numbers.*Received: labels of dtype"):
        fisher(model, (x, y.astype(str)))
    with pytest.raises(ValueError, match=r"Sparse categorical labels must be integers"):
        fisher(model, (x, y + 0.5))
    nan = y.astype(np.float32)
    nan[3] = np.nan
    with pytest.raises(ValueError, match=r"`data` labels \(y\) must be finite. Received: labels with 1 NaN or Inf"):
        fisher(model, (x, nan))


@pytest.mark.parametrize("loss", ["mse", BCE_LOGITS])
def test_regression_and_binary_labels_must_have_the_output_shape(loss):
    x, _ = data()
    y3 = (np.random.default_rng(0).random((13, 3)) > 0.5).astype(np.float32)
    model = mlp(classes=3)
    for labels in (y3[:, 0], y3[:, :2]):
        with pytest.raises(ValueError, match=r"`data` labels \(y\) for this loss must have the model output's "
                                             r"shape \(batch, 3\). Received: labels of shape \(batch,( 2)?\)"):
            fisher(model, (x, labels), loss=loss)
    with pytest.raises(ValueError, match=r"must be finite"):
        fisher(model, (x, np.where(y3 > 0, np.inf, 0.0)), loss=loss)
    single = mlp(classes=1)          # (batch,) labels for a (batch, 1) output, as Keras allows
    assert_same(fisher(single, (x, y3[:, 0]), loss=loss), fisher(single, (x, y3[:, :1]), loss=loss))
    bools = y3[:, :1] > 0
    assert_same(fisher(single, (x, bools), loss=loss), fisher(single, (x, y3[:, :1]), loss=loss))


# -- NaN and Inf --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("method", ["factored", "vmap", "loop"])
def test_non_finite_inputs_raise_naming_the_variable_and_data(value, method):
    x, y = data()
    x[4, 2] = value
    with pytest.raises(ValueError, match=r"The Fisher of variable '.*dense.*/kernel' is not finite \(\d+ of 48 "
                                         r"entries are NaN or Inf\): the `data` inputs \(x\) contain NaN or Inf"):
        fisher(mlp(), (x, y), method=method)


def test_non_finite_weights_raise_naming_them():
    model = mlp()
    model.layers[-1].bias.assign([0.0, np.inf, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"is not finite .*the `model` weights \['.*/bias'\] contain NaN or Inf"):
        fisher(model, data())


def test_overflow_raises_instead_of_returning_inf():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])     # linear: g = x ⊗ δ
    x, y = data()
    with pytest.raises(ValueError, match=r"is not finite .*overflowed float32: check the scale of `data`"):
        fisher(model, (x * 1e20, y))


def small_ewc(mode="separate", **kwargs):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
                              keras.layers.Dense(4, activation="softmax", name="out")])
    gamma = 0.5 if mode == "online" else 1.0
    ewc = fastewc.EWC(model, lam=2.0, mode=mode, gamma=gamma, **kwargs)
    ewc.consolidate(data(classes=4, seed=1), loss=SPARSE, jit_compile=False)
    for v in model.trainable_variables:          # "training" moves the weights
        v.assign_add(0.1 * np.ones(v.shape, np.float32))
    return model, ewc


def snapshot(ewc):
    return {"state": ewc.state(), "num_tasks": ewc.num_tasks, "const": float(ewc._const.numpy()),
            "paths": ewc.tracked_paths, "penalty": float(ewc.penalty().numpy())}


def assert_unchanged(ewc, before):
    after = snapshot(ewc)
    assert after["num_tasks"] == before["num_tasks"] and after["paths"] == before["paths"]
    assert after["const"] == before["const"] and after["penalty"] == before["penalty"]
    assert np.isfinite(after["penalty"])
    for key, (a, mu) in before["state"].items():
        np.testing.assert_array_equal(after["state"][key][0], a)
        np.testing.assert_array_equal(after["state"][key][1], mu)


def test_non_finite_data_or_weights_never_reach_the_ewc_state():
    model, ewc = small_ewc()
    before = snapshot(ewc)
    x, y = data(classes=4, seed=2)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"The Fisher of variable 'sequential.*/h/kernel' is not finite"):
        ewc.consolidate((x, y), loss=SPARSE)
    anchors = [v.numpy() for v in model.trainable_variables]
    anchors[2][0, 0] = np.nan
    fisher_ok = [np.ones(v.shape, np.float32) for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"`anchors` entry for variable '.*out/kernel' must be finite"):
        ewc.add_task(fisher_ok, anchors)
    model.layers[0].bias.assign(np.full(8, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"The `model` weights of variable '.*h/bias' must be finite"):
        ewc.add_task(fisher_ok)
    with pytest.raises(ValueError, match=r"the `model` weights \['.*h/bias'\] contain NaN"):
        ewc.consolidate(data(classes=4), loss=SPARSE)
    model.layers[0].bias.assign(np.zeros(8, np.float32))
    assert_unchanged(ewc, {**before, "penalty": float(ewc.penalty().numpy())})   # weights moved, not state


def test_add_task_argument_types():
    model, ewc = small_ewc()
    before = snapshot(ewc)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    with pytest.raises(TypeError, match=r"`fisher` must be a list of arrays or tensors.*Received: fisher of type NoneType"):
        ewc.add_task(None)
    with pytest.raises(TypeError, match=r"`anchors` must be a list.*Received: anchors of type float"):
        ewc.add_task([np.ones(s) for s in shapes], 1.0)
    with pytest.raises(TypeError, match=r"`fisher` entry for variable '.*h/kernel' must be an array of real numbers"):
        ewc.add_task([np.full(s, "a") for s in shapes])
    with pytest.raises(TypeError, match=r"`fisher` entry for variable '.*h/kernel' must be an array of real numbers"):
        ewc.add_task([[[1.0], [1.0, 2.0]]] + [np.ones(s) for s in shapes[1:]])       # ragged
    with pytest.raises(ValueError, match=r"`fisher`: the Fisher of variable '.*h/bias' must be finite and >= 0"):
        ewc.add_task([np.ones(s) if i != 1 else -np.ones(s) for i, s in enumerate(shapes)])
    assert_unchanged(ewc, before)
    ewc.add_task([np.ones(s).tolist() for s in shapes])       # nested lists of numbers are fine
    assert ewc.num_tasks == 2


def test_functional_core_argument_checks():
    v = [tf.Variable(tf.ones((2, 3)))]
    f, a = [np.ones((2, 3), np.float32)], [np.zeros((2, 3), np.float32)]
    with pytest.raises(TypeError, match=r"`variables` must be a list .*Received: variables of type NoneType"):
        fastewc.ewc_penalty(None, f, a, 1.0)
    with pytest.raises(TypeError, match=r"`fisher` must be a list .*Received: fisher of type str"):
        fastewc.ewc_penalty_gradients(v, "f", a, 1.0)
    for lam in (-1, float("nan"), float("inf"), True, "1", None):
        # one λ rule (fastewc._checks.check_lam): a negative number gets "must be >= 0"
        with pytest.raises(ValueError, match=r"`lam` must be (a finite number )?>= 0. Received: lam="):
            fastewc.ewc_penalty(v, f, a, lam)
        with pytest.raises(ValueError, match=r"`lam` must be (a finite number )?>= 0"):
            fastewc.ewc_penalty_and_gradients(v, f, a, lam)
    assert float(fastewc.ewc_penalty(v, [[[1.0] * 3] * 2], a, np.float32(2.0))) == 6.0   # lists are fine


# -- data of unknown length ---------------------------------------------------------------
def test_a_generator_dataset_of_unknown_length_streams():
    x, y = data(n=23)
    sizes = [5, 3, 7, 2, 6]                  # uneven batches, rebatched to batch_size
    produced = []

    def batches():
        start, count = 0, 0
        for n in sizes:
            count += 1
            yield x[start:start + n].astype(np.float64), y[start:start + n]
            start += n
        produced.append(count)

    ds = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((None, 6), tf.float64), tf.TensorSpec((None,), tf.int64)))
    assert int(ds.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    model = mlp()
    want = fisher(model, (x, y), kind="exact", batch_size=4)
    got = fisher(model, ds, kind="exact", batch_size=4)
    assert_same(got, [w.numpy() for w in want], rtol=1e-6, atol=1e-9)
    assert produced[-1] == len(sizes)        # the whole generator went through, once
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.consolidate(ds, loss=LOGITS, batch_size=4)
    assert ewc.num_tasks == 1


def test_a_plain_python_generator_gets_a_hint():
    x, y = data()
    with pytest.raises(ValueError, match=r"Received: data of type generator; wrap a Python generator or iterator "
                                         r"in tf.data.Dataset.from_generator"):
        fisher(mlp(), ((x[i:i + 4], y[i:i + 4]) for i in range(0, 13, 4)))


# -- BatchNormalization and Dropout: inference mode -----------------------------------------
class FrozenBatchNorm(keras.layers.Layer):
    """BatchNormalization in inference mode written out: γ (x − m)/√(v + ε) + β with the
    moving statistics as constants and γ, β trainable."""

    def __init__(self, mean, var, epsilon, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.var, self.epsilon = mean, var, epsilon

    def build(self, shape):
        self.gamma = self.add_weight(shape=(shape[-1],), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(shape[-1],), initializer="zeros", name="beta")

    def call(self, x):
        return self.gamma * (x - self.mean) / np.sqrt(self.var + self.epsilon) + self.beta


def bn_dropout_model():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.9),
                              keras.layers.Dense(5, name="out")])
    rng = np.random.default_rng(3)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    bn.beta.assign(rng.normal(size=8).astype(np.float32))
    bn.moving_mean.assign(rng.normal(scale=0.5, size=8).astype(np.float32))       # far from the
    bn.moving_variance.assign(rng.uniform(0.05, 3.0, 8).astype(np.float32))       # batch statistics
    return model


def inference_twin(model):
    bn = model.get_layer("bn")
    twin = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
        FrozenBatchNorm(bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon, name="bn"),
        keras.layers.Dense(5, name="out")])
    for a, b in zip(twin.trainable_variables, model.trainable_variables):
        a.assign(b)
    return twin


def test_batchnorm_and_dropout_run_in_inference_mode():
    model = bn_dropout_model()
    x, y = data(n=16)
    want = fisher(inference_twin(model), (x, y), kind="exact", method="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # 'auto' warns if a layer has no factored rule
        for method in ("auto", "factored", "vmap", "jacobian", "loop"):
            got = fisher(model, (x, y), kind="exact", method=method, batch_size=5)
            assert_same(got, want, rtol=1e-5, atol=1e-9)
    # The test can tell: in training mode Dropout(0.9) and the batch statistics change the output.
    assert not np.allclose(model(x, training=True), model(x, training=False), atol=1e-3)


def test_dropout_only_model_with_the_factored_method():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dropout(0.9), keras.layers.Dense(5)])
    twin = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(5)])
    twin.set_weights(model.get_weights())
    x, y = data()
    assert_same(fisher(model, (x, y), kind="exact", method="factored"),
                fisher(twin, (x, y), kind="exact", method="loop"), rtol=1e-5, atol=1e-9)


def test_fisher_does_not_update_batchnorm_statistics_nor_any_variable():
    model = bn_dropout_model()
    x, y = data(n=16)
    before = {v.path: v.numpy().copy() for v in model.variables}   # moving stats, dropout seed state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("auto", "factored", "vmap", "jacobian", "loop"):
            fisher(model, (x, y), method=method)
        fastewc.EWC(model, lam=1.0).consolidate((x, y), loss=LOGITS)
    for v in model.variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)


# -- numerical safety: float64 accumulation -------------------------------------------------
def unit_model():
    """o = w·x with w = 1: for the MSE likelihood and labels y = x − 1 the per-example
    gradient is exactly x, so F = mean(x²)."""
    return keras.Sequential([keras.Input((1,)),
                             keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])


def test_float64_accumulation_over_a_million_examples():
    """2^20 examples in 1024 batches of 1024.  Batch 0 has x = 2^13 (per-batch sum 2^36),
    the other 1023 batches x = 2 (sum 4096 each: exactly half an ulp of 2^36 in float32).
    A float32 running total loses every one of them (F = 65536); float64 keeps them
    (F = 65539.996 -> 65540 in float32).  All per-batch sums are exact in float32."""
    n, b = 2**20, 2**10
    x = np.full((n, 1), 2.0, np.float32)
    x[:b] = 2.0**13
    exact = np.sum(np.square(x, dtype=np.float64)) / n
    batch_sums = np.square(x.astype(np.float64)).reshape(-1, b).sum(axis=1)
    float32_total = np.float32(0.0)
    for s in batch_sums.astype(np.float32):
        float32_total = np.float32(float32_total + s)
    assert float32_total / n == 65536.0 and abs(exact - 65536.0) > 3.99      # float32 visibly drifts
    got = fisher(unit_model(), (x, x - 1.0), loss="mse", batch_size=b)
    assert got[0].numpy()[0, 0] == np.float32(exact) == 65540.0


def test_a_million_random_examples_match_the_float64_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2**20, 1)).astype(np.float32)
    y = (x - rng.normal(size=x.shape)).astype(np.float32)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="ones")])
    r = x.astype(np.float64) - y
    want = [np.mean((x * r) ** 2).reshape(1, 1), np.mean(r**2).reshape(1)]
    assert_same(fisher(model, (x, y), loss="mse", batch_size=2**12), want, rtol=2e-6)


def test_one_huge_batch_matches_the_float64_sum():
    """batch_size=2^20 still sums in float64 across calls of at most FACTORED_MAX_ROWS rows
    (one float32 contraction over 2^20 rows alone drifts by 1e-3, measured)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2**20, 1)).astype(np.float32)
    y = (x - rng.normal(size=x.shape)).astype(np.float32)
    r = x.astype(np.float64) - y
    got = fisher(unit_model(), (x, y), loss="mse", batch_size=2**20)
    np.testing.assert_allclose(got[0].numpy()[0, 0], np.mean((x * r) ** 2), rtol=2e-6)


# -- no lost state: consolidate is all or nothing --------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_consolidate_interrupted_midway_leaves_the_state_unchanged(mode, monkeypatch):
    model, ewc = small_ewc(mode)
    before = snapshot(ewc)
    weights = [w.copy() for w in model.get_weights()]
    x, y = data(n=40, classes=4, seed=5)

    def failing_batches():                      # a data pipeline that breaks at batch 3
        for i in range(0, 40, 8):
            if i == 16:
                raise RuntimeError("disk went away")
            yield x[i:i + 8], y[i:i + 8]

    ds = tf.data.Dataset.from_generator(failing_batches, output_signature=(
        tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64)))
    with pytest.raises(Exception, match="disk went away"):
        ewc.consolidate(ds, loss=SPARSE, batch_size=8)
    assert_unchanged(ewc, before)

    calls = []
    real = Engine.run

    def interrupted(*args, **kwargs):           # Ctrl-C during the third batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(Engine, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ewc.consolidate((x, y), loss=SPARSE, batch_size=8)
    monkeypatch.undo()
    assert_unchanged(ewc, before)
    for w, w0 in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(w, w0)
    assert all("call" not in layer.__dict__ for layer in model.layers)     # no layer left patched


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_a_failure_while_writing_the_new_state_is_rolled_back(mode, monkeypatch, tmp_path):
    model, ewc = small_ewc(mode)
    model.add(keras.layers.Dense(3, name="head2"))         # new variables enter at this task
    before = snapshot(ewc)
    variable_type = type(ewc._tracked()["h/kernel"][0])      # the class of A's variable
    real_assign = variable_type.assign
    assigns = []

    def flaky_assign(self, *args, **kwargs):
        assigns.append(1)
        if len(assigns) == 3:                             # after two variables were written
            raise MemoryError("injected")
        return real_assign(self, *args, **kwargs)

    fisher_new = [np.full(v.shape, 0.5, np.float32) for v in model.trainable_variables]
    monkeypatch.setattr(variable_type, "assign", flaky_assign)
    with pytest.raises(MemoryError, match="injected"):
        ewc.add_task(fisher_new)
    monkeypatch.undo()
    assert assigns, "the injection did not run"
    assert_unchanged(ewc, before)
    assert "head2/kernel" not in ewc.tracked_paths
    # The state is usable afterwards: a task goes in, and a checkpoint round-trips.
    ewc.add_task(fisher_new)
    assert ewc.num_tasks == 2 and "head2/kernel" in ewc.tracked_paths
    path = tf.train.Checkpoint(ewc=ewc).save(str(tmp_path / "ckpt"))
    other = fastewc.EWC(model, lam=1.0, mode=mode, gamma=0.5 if mode == "online" else 1.0)
    tf.train.Checkpoint(ewc=other).restore(path).assert_existing_objects_matched()
    assert other.penalty().numpy() == ewc.penalty().numpy()


# -- no lost state: save is atomic ----------------------------------------------------------
def test_a_save_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    model, ewc = small_ewc()
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    previous = path.read_bytes()
    ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(ewc_file_lib.np, "savez", broken_savez)
    with pytest.raises(OSError, match="No space left"):
        ewc.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == previous and os.listdir(tmp_path) == ["ewc.npz"]
    assert fastewc.EWC.load(path, model).num_tasks == 1


CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, keras, fastewc
    from fastewc import ewc_file as ewc_file_lib

    path, how = sys.argv[1], sys.argv[2]
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(1024, name="big"),
                              keras.layers.Dense(4, name="out")])
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])
    ewc.save(path)                                   # the previous, complete file: 1 task
    print("saved", flush=True)
    if how == "stall":
        real = np.savez
        def slow_savez(f, **arrays):                 # write half the file, then hang
            import io
            buffer = io.BytesIO()
            real(buffer, **arrays)
            raw = buffer.getvalue()
            f.write(raw[: len(raw) // 2])
            f.flush()
            print("mid-save", flush=True)
            time.sleep(600)
        ewc_file_lib.np.savez = slow_savez
        ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])
        ewc.save(path)
    else:                                            # save over and over until killed
        for i in range(10**6):
            ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])
            print("saving", i, flush=True)
            ewc.save(path)
""")


def child_model():
    return keras.Sequential([keras.Input((512,)), keras.layers.Dense(1024, name="big"),
                             keras.layers.Dense(4, name="out")])


def run_child_until(tmp_path, how, marker):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "ewc.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, str(script), str(path), how], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0, env=env)
    try:
        deadline, seen = time.monotonic() + 300, b""
        while marker.encode() + b"\n" not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} from the child; it printed {seen[-500:]!r}"
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            assert chunk or not ready, f"the child ended early; it printed {seen[-500:]!r}"
            seen += chunk
        return proc, path
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_save_is_atomic_when_the_process_is_killed_mid_write(tmp_path):
    proc, path = run_child_until(tmp_path, "stall", "mid-save")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    loaded = fastewc.EWC.load(path, child_model())         # the previous file, whole
    assert loaded.num_tasks == 1
    assert all(np.all(a == 1.0) for a, _ in loaded.state().values())
    partial = glob.glob(str(tmp_path / ".ewc.npz.*.tmp"))
    assert len(partial) == 1                                # the kill did land mid-save ...
    with pytest.raises(ValueError, match="not a valid fastewc EWC file"):
        fastewc.EWC.load(partial[0], child_model())         # ... and a torn file is refused


def test_save_is_atomic_when_the_process_is_killed_at_a_random_time(tmp_path):
    proc, path = run_child_until(tmp_path, "loop", "saving 2")
    time.sleep(np.random.default_rng().uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    loaded = fastewc.EWC.load(path, child_model())          # some complete save, checksum verified
    assert loaded.num_tasks >= 1
    a = [a for a, _ in loaded.state().values()]
    assert all(np.all(x == a[0].flat[0]) for x in a)        # one task count throughout


def test_gaussian_exact_fisher_on_data_sets_of_different_sizes():
    """A second batch shape relaxes the compiled function's batch dimension to None; the
    exact Gaussian cotangents must not need it (found by tests/test_properties.py)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    ewc = fastewc.EWC(model, lam=1.0)
    for n in (8, 3, 20):
        x, y = rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)
        got = ewc.consolidate((x, y), loss="mse", method="factored", jit_compile=False)
        assert_same(got, fisher(model, (x, y), loss="mse", kind="exact", method="loop"), rtol=1e-5, atol=1e-9)
    assert ewc.num_tasks == 3
