"""Bounded fuzz of fisher_diagonal and EWC (hypothesis, derandomized: the same examples in
every CI run, within a fixed number of examples and a per-example deadline).

The contract under random inputs (shapes, dtypes, NaN/Inf, labels, arguments, data
containers): every call either returns finite, non-negative float32 tensors of the right
shapes, or raises ValueError/TypeError whose message names the argument at fault.  Never
another exception type, never NaN out, and an EWC call that raises leaves the state as it
was.
"""
import datetime
import os
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastewc

# Examples per fuzz test: 50 in `make test` (the same derandomized draws every run),
# FASTEWC_FUZZ_EXAMPLES in `make test-slow` (300).
FUZZ = settings(max_examples=int(os.environ.get("FASTEWC_FUZZ_EXAMPLES", "50")), deadline=datetime.timedelta(seconds=30), derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))

ARGUMENTS = ("data", "loss", "kind", "method", "batch_size", "num_samples", "seed", "jit_compile",
             "verbose", "model", "lam", "gamma", "mode", "exclude", "fisher", "anchors")


def assert_names_an_argument(err):
    message = str(err)
    named = any(f"`{name}`" in message for name in ARGUMENTS) or re.search(r"\blabels\b", message, re.I)
    assert named, f"{type(err).__name__} does not name the argument at fault: {message[:500]}"


def assert_good_fisher(fisher, model):
    assert isinstance(fisher, list) and len(fisher) == len(model.trainable_variables)
    for f, v in zip(fisher, model.trainable_variables):
        assert isinstance(f, tf.Tensor) and f.dtype == tf.float32 and tuple(f.shape) == tuple(v.shape)
        values = f.numpy()
        assert np.all(np.isfinite(values)) and np.all(values >= 0.0), v.path


# -- a fixed pool of models (compiled functions are cached per model) ----------------------
class Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.h = keras.layers.Dense(5, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.h(x))


def _pool():
    def seq(units, activation):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="h"),
                                 keras.layers.Dense(units, activation=activation, name="out")])
    sub = Sub()
    sub(np.zeros((1, 4), np.float32))
    return {"logits": seq(3, None), "softmax": seq(3, "softmax"), "sigmoid": seq(2, "sigmoid"),
            "linear": seq(2, None), "subclassed": sub}


POOL = {}


def model_named(name):
    if not POOL:
        POOL.update(_pool())
    return POOL[name]


SCCE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MATCHING = {    # model -> losses that fit its output, with the label kind each needs
    "logits": [(SCCE_LOGITS, "ids"), (keras.losses.CategoricalCrossentropy(from_logits=True), "onehot")],
    "softmax": [("sparse_categorical_crossentropy", "ids"), ("categorical_crossentropy", "onehot")],
    "sigmoid": [("binary_crossentropy", "bits")],
    "linear": [("mse", "reals"), (keras.losses.BinaryCrossentropy(from_logits=True), "bits")],
    "subclassed": [(SCCE_LOGITS, "ids")],
}
OTHER_LOSSES = [SCCE_LOGITS, "sparse_categorical_crossentropy", "categorical_crossentropy",
                "binary_crossentropy", "mse", "hinge", None, 3]
VALID_X_DTYPES = ["float32", "float32", "float64", "float16", "int32", "int64", "bool"]
DEFECTS = ["none"] * 6 + ["x_dtype", "x_shape", "x_nonfinite", "x_huge", "y_range", "y_dtype", "y_shape",
                          "y_nonfinite", "length", "empty", "container", "loss"]


@st.composite
def label_values(draw, kind, n, rng):
    if kind == "ids":
        return rng.integers(0, 3, size=n).astype(draw(st.sampled_from(["int64", "int32", "float32", "uint8"])))
    if kind == "onehot":
        return np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=n)]
    if kind == "bits":
        return rng.integers(0, 2, size=(n, 2)).astype(draw(st.sampled_from(["float32", "bool", "int32"])))
    return rng.normal(size=(n, 2)).astype(np.float32)


@st.composite
def fisher_problem(draw, name):
    """(data, loss) for the pooled model ``name``: valid, or with one defect."""
    loss, label_kind = draw(st.sampled_from(MATCHING[name]))
    defect = draw(st.sampled_from(DEFECTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = 0 if defect == "empty" else draw(st.integers(1, 9))
    tail = draw(st.sampled_from([(3,), (), (4, 2), (2, 4)])) if defect == "x_shape" else (4,)
    x = rng.normal(size=(n,) + tail) * draw(st.sampled_from([1.0, 0.0, 5.0]))
    dtype = draw(st.sampled_from(["str", "complex64"] if defect == "x_dtype" else VALID_X_DTYPES))
    if defect == "x_nonfinite":
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        dtype = draw(st.sampled_from(["float32", "float64", "float16"]))
    if defect == "x_huge":
        x, dtype = x * 1e30, draw(st.sampled_from(["float32", "float16"]))
    if dtype in ("int32", "int64"):
        x = np.round(3 * x)
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(dtype) if dtype != "bool" else x > 0
    y = draw(label_values(label_kind, n + (1 if defect == "length" else 0), rng))
    if defect == "y_range":
        y = y.astype(np.float32) + draw(st.sampled_from([5.0, -2.0, 0.5]))
    elif defect == "y_dtype":
        y = y.astype(str)
    elif defect == "y_shape":
        y = y[:, None] if y.ndim == 1 and draw(st.booleans()) else np.ones((len(y), 4), np.float32)
    elif defect == "y_nonfinite" and len(y):
        y = y.astype(np.float32)
        y.flat[draw(st.integers(0, y.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    if defect == "loss":
        loss = draw(st.sampled_from(OTHER_LOSSES))
    container = draw(st.sampled_from(["tuple", "tuple", "list", "dataset"]))
    if defect == "container":
        data = draw(st.sampled_from([None, 3, "xy", {"x": x, "y": y}, (x,), (x, y, y), x,
                                     iter([(x, y)])]))
    elif container == "list":
        data = [x, y]
    elif container == "dataset" and len(y) == n:
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(draw(st.integers(1, 4)))
    else:
        data = (x, y)
    return data, loss, defect


VALID_KWARGS = dict(kind=["exact", "empirical", "sampled"], method=["auto", "factored", "loop", "vmap"],
                    batch_size=[256, 1, 3, 4], num_samples=[1, 2], seed=[None, 0, 7], jit_compile=[False],
                    verbose=[0])
INVALID_KWARGS = dict(kind=["fisher", None, 1], method=["fast", None], batch_size=[0, -2, 2.0, None, True],
                      num_samples=[0, "2"], seed=[-1, 2**31, 1.5, "7"], jit_compile=["yes", 1],
                      verbose=[3, -1])


@st.composite
def fisher_kwargs(draw, names=tuple(VALID_KWARGS)):
    """Valid arguments, or valid but for one."""
    kwargs = {k: draw(st.sampled_from(VALID_KWARGS[k])) for k in names}
    if draw(st.integers(0, 9)) >= 7:                    # 3 in 10: one argument is broken
        broken = draw(st.sampled_from(list(names)))
        kwargs[broken] = draw(st.sampled_from(INVALID_KWARGS[broken]))
    return kwargs


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # method='auto' may warn once per layer class
        yield


@FUZZ
@given(name=st.sampled_from(sorted(MATCHING)), problem=st.data(), kwargs=fisher_kwargs())
def test_fuzz_fisher_diagonal(name, problem, kwargs):
    model = model_named(name)
    data, loss, defect = problem.draw(fisher_problem(name))
    before = [v.numpy().copy() for v in model.variables]
    try:
        fisher = fastewc.fisher_diagonal(model, data, loss=loss, **kwargs)
    except (ValueError, TypeError) as err:
        event(f"{defect}: {type(err).__name__}: {str(err)[:40]}")
        assert_names_an_argument(err)
    else:
        event(f"{defect}: returned a Fisher")
        assert_good_fisher(fisher, model)
    for v, w in zip(model.variables, before):          # never touches the model
        np.testing.assert_array_equal(v.numpy(), w)


# -- EWC ----------------------------------------------------------------------------------
def snapshot(ewc):
    return (ewc.num_tasks, float(ewc._const.numpy()), ewc.tracked_paths,
            {k: (a.copy(), mu.copy()) for k, (a, mu) in ewc.state().items()})


def assert_same_state(ewc, before):
    num_tasks, const, paths, state = snapshot(ewc)
    assert (num_tasks, const, paths) == before[:3]
    for key, (a, mu) in before[3].items():
        np.testing.assert_array_equal(state[key][0], a)
        np.testing.assert_array_equal(state[key][1], mu)


def assert_good_penalty(ewc, model):
    value, grads = ewc.penalty_and_gradients()
    assert value.dtype == tf.float32 and value.shape == ()
    assert np.isfinite(value.numpy()) and value.numpy() >= 0.0
    assert len(grads) == len(model.trainable_variables)
    for g, v in zip(grads, model.trainable_variables):
        assert g.dtype == tf.float32 and tuple(g.shape) == tuple(v.shape) and np.all(np.isfinite(g.numpy()))


@st.composite
def task_arrays(draw, model):
    """``fisher`` / ``anchors`` for add_task: aligned lists with random defects."""
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    defect = draw(st.sampled_from(["none", "none", "none", "nan", "negative", "inf", "shape", "length",
                                   "dtype", "ragged", "not_a_list"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = [np.abs(rng.normal(size=s)).astype(draw(st.sampled_from(["float32", "float64"]))) for s in shapes]
    i = draw(st.integers(0, len(shapes) - 1))
    if defect in ("nan", "inf", "negative"):
        values[i].flat[0] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[defect]
    elif defect == "shape":
        values[i] = np.ones(shapes[i] + (1,), np.float32)
    elif defect == "length":
        values = values[:-1]
    elif defect == "dtype":
        values[i] = np.full(shapes[i], "a")
    elif defect == "ragged":
        values[i] = [[1.0], [1.0, 2.0]]
    elif defect == "not_a_list":
        values = draw(st.sampled_from([None, 1.0, "fisher"]))
    return values


@st.composite
def ewc_operations(draw, model, name):
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["consolidate", "consolidate", "add_task", "add_task_anchors",
                                   "nan_weights", "lam", "penalty"]))
        if op == "consolidate":
            data, loss, _ = draw(fisher_problem(name))
            ops.append((op, data, loss, draw(fisher_kwargs(("kind", "method", "batch_size")))))
        elif op == "add_task":
            ops.append((op, draw(task_arrays(model)), None))
        elif op == "add_task_anchors":
            ops.append(("add_task", draw(task_arrays(model)), draw(task_arrays(model))))
        elif op == "nan_weights":
            ops.append((op, draw(st.integers(0, len(model.trainable_variables) - 1))))
        elif op == "lam":
            ops.append((op, draw(st.sampled_from([0.0, 3.0, -1.0, float("nan"), "big", None]))))
        else:
            ops.append((op,))
    return ops


@FUZZ
@given(name=st.sampled_from(["logits", "softmax", "linear"]), lam=st.sampled_from([1.0, 0.0, 2, -1.0, float("nan"), "a", None]),
       mode=st.sampled_from(["separate", "online", "online", "sum", None]),
       gamma=st.sampled_from([1.0, 0.5, 0.0, 1.5, -0.1, float("nan")]),
       exclude=st.sampled_from([None, None, ["h/bias"], ["nope/kernel"], 3]), data=st.data())
def test_fuzz_ewc(name, lam, mode, gamma, exclude, data):
    model = model_named(name)
    weights = [v.numpy().copy() for v in model.trainable_variables]
    try:
        ewc = fastewc.EWC(model, lam=lam, mode=mode, gamma=gamma, exclude=exclude)
    except (ValueError, TypeError) as err:
        assert_names_an_argument(err)
        return
    try:
        for op in data.draw(ewc_operations(model, name)):
            before = snapshot(ewc)
            try:
                if op[0] == "consolidate":
                    fisher = ewc.consolidate(op[1], loss=op[2], jit_compile=False, **op[3])
                    assert_good_fisher(fisher, model)
                elif op[0] == "add_task":
                    ewc.add_task(op[1], op[2])
                elif op[0] == "nan_weights":
                    variable = model.trainable_variables[op[1]]
                    variable.assign(np.full(variable.shape, np.nan, np.float32))
                    try:
                        with pytest.raises(ValueError, match=r"`model` weights"):
                            ewc.consolidate((np.zeros((3, 4), np.float32), np.zeros(3, np.int64)),
                                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                            jit_compile=False)
                        if ewc._tracking.key(variable) in ewc.tracked_paths:   # not an excluded one
                            with pytest.raises(ValueError, match=r"`model` weights of variable"):
                                ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])
                    finally:
                        variable.assign(weights[op[1]])
                    assert_same_state(ewc, before)
                elif op[0] == "lam":
                    ewc.lam = op[1]
            except (ValueError, TypeError) as err:
                event(f"{op[0]} -> {type(err).__name__}: {str(err)[:30]}")
                assert_names_an_argument(err)
                assert_same_state(ewc, before)           # all or nothing
            else:
                event(f"{op[0]} -> ok")
            assert_good_penalty(ewc, model)
            for v in model.trainable_variables:           # weights move, as in training
                v.assign_add(0.1 * np.ones(v.shape, np.float32))
    finally:
        for v, w in zip(model.trainable_variables, weights):
            v.assign(w)
