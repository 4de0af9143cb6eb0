"""Issue 26 item 2: a penalty traced before the penalty's structure grew (Kronecker terms
created at a consolidation, a new head's variables tracked) is never a silently partial
value: eagerly it is right, a stale ``tf.function`` trace raises, a stale XLA trace returns
NaN (value and gradient), the consolidation that staled a trace warns, and a new trace is
right again.  References: float64 NumPy, the Kronecker terms with an explicit np.kron."""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc

from conftest import assert_close

LAM = 2.0
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STALE = r"traced the EWC penalty before a consolidation or a checkpoint restore"


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.Dense(3, name="d2")])


def _weights(model):
    return {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}


def _kfac_reference(model, tasks):
    """½λ Σ_tasks Σ_blocks vec(ΔW̄)ᵀ (A ⊗ G) vec(ΔW̄), W̄ = [kernel; bias] (row-major vec)."""
    now, total = _weights(model), 0.0
    for blocks, anchor in tasks:
        for (kernel, bias), (a, g) in blocks.items():
            delta = np.vstack([now[kernel] - anchor[kernel], (now[bias] - anchor[bias])[None]]).reshape(-1)
            total += delta @ np.kron(a, g) @ delta
    return 0.5 * LAM * total


def _diagonal_reference(model, tasks):
    """½λ Σ_tasks Σ_i F_i (θ_i − θ_t,i)² over the variables each task has a Fisher for."""
    now = _weights(model)
    return 0.5 * LAM * sum(float(np.sum(f * (now[p] - anchor[p]) ** 2))
                           for fisher, anchor in tasks for p, f in fisher.items())


def _consolidate_kfac(ewc, model, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    result = ewc.consolidate((x, y), loss=LOGITS)
    blocks = {tuple(v.path for v in b.variables): (np.float64(b.a.numpy()), np.float64(b.g.numpy()))
              for b in result.blocks}
    task = (blocks, _weights(model))
    for v in model.trainable_variables:
        v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))
    return task


def _traced(ewc, jit):
    @tf.function(jit_compile=jit, autograph=False)
    def value_and_grads():
        with tf.GradientTape() as tape:
            value = ewc.penalty()
        return value, tape.gradient(value, ewc.model.trainable_variables)
    return value_and_grads


def _assert_stale(fn, jit):
    if jit:                                    # XLA drops the assertion: NaN, loudly
        value, grads = fn()
        assert np.isnan(float(value)) and all(np.isnan(g.numpy()).all() for g in grads)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match=STALE):
            fn()


@pytest.mark.parametrize("jit", [False, True], ids=["function", "jit"])
def test_kfac_penalty_traced_before_the_first_task_is_never_a_silent_zero(jit):
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac")
    early = _traced(ewc, jit)
    assert float(early()[0]) == 0.0
    tasks = []
    for seed in (1, 2):
        with pytest.warns(RuntimeWarning, match="a tf.function traced the EWC penalty before"):
            tasks.append(_consolidate_kfac(ewc, model, seed))
        expected = _kfac_reference(model, tasks)
        assert expected > 1e-3
        assert_close(float(ewc.penalty()), expected)                 # eager
        _assert_stale(early, jit)
        early = _traced(ewc, jit)                                    # traced again: right
        assert_close(float(early()[0]), expected)


@pytest.mark.parametrize("jit", [False, True], ids=["function", "jit"])
def test_diagonal_penalty_traced_before_a_new_head_entered_is_never_partial(jit):
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    head_a = keras.layers.Dense(3, name="a")(hidden)
    ewc = fastewc.EWC(keras.Model(inp, head_a), lam=LAM)
    rng = np.random.default_rng(0)

    def add_task():
        fisher = [rng.uniform(0.5, 2.0, v.shape).astype("float32") for v in ewc.model.trainable_variables]
        task = ({v.path: f.astype(np.float64) for v, f in zip(ewc.model.trainable_variables, fisher)},
                _weights(ewc.model))
        ewc.add_task(fisher)
        for v in ewc.model.trainable_variables:
            v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))
        return task

    tasks = [add_task()]
    fn = _traced(ewc, jit)
    assert_close(float(fn()[0]), _diagonal_reference(ewc.model, tasks))
    tasks.append(add_task())              # same structure: the trace stays right, no warning
    assert_close(float(fn()[0]), _diagonal_reference(ewc.model, tasks))
    fn = _traced(ewc, jit)
    fn()
    head_b = keras.layers.Dense(2, name="b")(hidden)
    ewc.model = keras.Model(inp, [head_a, head_b])
    with pytest.warns(RuntimeWarning, match="a tf.function traced the EWC penalty before"):
        tasks.append(add_task())          # b enters the state: the trace cannot see it
    assert "b/kernel" in ewc.tracked_paths
    expected = _diagonal_reference(ewc.model, tasks)
    assert_close(float(ewc.penalty()), expected)
    _assert_stale(fn, jit)
    assert_close(float(_traced(ewc, jit)()[0]), expected)


def test_trainers_retrace_without_a_warning_or_error():
    """make_train_step and EWCModel trace inline and retrace on the structure token: their
    traces are never stale, and a consolidation does not warn about them."""
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac")
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.0), LOGITS, ewc=ewc, jit_compile=False)
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOGITS, jit_compile=True)
    x, y = np.ones((4, 5), np.float32), np.zeros(4, np.int64)
    step(x, y)
    wrapped.fit(x, y, epochs=1, verbose=0)
    wrapped.evaluate(x, y, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tasks = [_consolidate_kfac(ewc, model, 1)]
    expected = _kfac_reference(model, tasks)
    assert_close(float(step(x, y)) - float(LOGITS(y, model(x))), expected, rtol=1e-4)
    logs = wrapped.evaluate(x, y, verbose=0, return_dict=True)
    assert_close(logs["ewc_penalty"], expected)
