"""Multi-head models, issue 26 item 6: every head of one functional model consolidates into
ONE EWC of the whole model, each with its single-output sub-model
(``ewc.consolidate(data, loss=..., model=keras.Model(full.inputs, full.outputs[i]))``).

The reference is built from the definitions in float64 NumPy: each task's Fisher is that of
its head's chain (trunk → head) on a float64 Sequential copy of the weights at the task
(:func:`fastewc.testing.reference_fisher`, :func:`fastewc.testing.reference_kronecker_factors`),
0 on the other head; then

    separate: P(θ) = Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)²,
    online:   P(θ) = λ/2 Σ_i (γ F_A,i + F_B,i) (θ_i − θ_B,i)²   (γ decays every variable),
    kfac:     P(θ) = Σ_t λ/2 Σ_blocks of t vec(W̄ − W̄_t)ᵀ (A_t ⊗ G_t) vec(W̄ − W̄_t),

and its gradient, against ``ewc.penalty()`` and its tape gradient."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.testing import reference_fisher, reference_kronecker_factors

from conftest import assert_close, perturb

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAM, GAMMA = 3.0, 0.5
UNITS = {"trunk": 5, "ha": 3, "hb": 2}


def two_heads():
    """Input(4) → Dense 'trunk'(5, tanh) → heads Dense 'ha'(3) and Dense 'hb'(2); returns
    the two-output model and each head's sub-model on the same layers."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((4,))
    h = keras.layers.Dense(UNITS["trunk"], activation="tanh", name="trunk")(inp)
    full = keras.Model(inp, [keras.layers.Dense(UNITS["ha"], name="ha")(h),
                             keras.layers.Dense(UNITS["hb"], name="hb")(h)])
    return full, {head: keras.Model(full.inputs, full.outputs[i]) for i, head in enumerate(("ha", "hb"))}


def head_data(head, seed, n=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, UNITS[head], size=n)


def weights(full):
    """{layer name: (kernel, bias)} in float64."""
    return {layer.name: tuple(w.astype(np.float64) for w in layer.get_weights())
            for layer in full.layers if layer.weights}


def chain64(full, head):
    """trunk → head as a float64 Sequential with the current weights (not the fast path's
    model: an independent copy)."""
    w = weights(full)
    twin = keras.Sequential([keras.Input((4,), dtype="float64"),
                             keras.layers.Dense(UNITS["trunk"], activation="tanh", dtype="float64", name="trunk"),
                             keras.layers.Dense(UNITS[head], dtype="float64", name=head)])
    for layer in twin.layers:
        layer.set_weights(list(w[layer.name]))
    return twin


def reference_task(full, head, x, y, curvature):
    """{layer: (F_kernel, F_bias)} (diagonal) or {layer: (A, G)} (kfac) of the head's task,
    and the weights θ_t."""
    twin = chain64(full, head)
    if curvature == "kfac":
        per_layer = reference_kronecker_factors(twin, x, y, loss=LOSS, kind="exact")
    else:
        f = reference_fisher(twin, x, y, loss=LOSS, kind="exact")
        per_layer = {"trunk": (f[0], f[1]), head: (f[2], f[3])}
    return per_layer, weights(full)


def wbar(kernel_bias):
    kernel, bias = kernel_bias
    return np.vstack([kernel, bias[None]])


def reference_penalty(theta, tasks, mode, curvature):
    """(value, {layer: (grad kernel, grad bias)}) of the penalty in float64."""
    value, grads = 0.0, {name: [np.zeros_like(k), np.zeros_like(b)] for name, (k, b) in theta.items()}
    if mode == "online":       # one quadratic: γ·F_A + F_B (F_A = 0 off head A), anchor θ_B
        (fa, _), (fb, anchor) = tasks
        tasks = [({name: tuple(GAMMA * np.asarray(fa.get(name, (0.0, 0.0))[i]) +
                               np.asarray(fb.get(name, (0.0, 0.0))[i]) for i in range(2))
                   for name in theta}, anchor)]
    for per_layer, anchor in tasks:
        for name, (p, q) in per_layer.items():
            if curvature == "kfac":        # P = λ/2 vec(Δ)ᵀ (A ⊗ G) vec(Δ), row-major vec
                delta = wbar(theta[name]) - wbar(anchor[name])
                m = (np.kron(p, q) @ delta.reshape(-1)).reshape(delta.shape)
                value += 0.5 * LAM * float(delta.reshape(-1) @ m.reshape(-1))
                grads[name][0] += LAM * m[:-1]
                grads[name][1] += LAM * m[-1]
            else:
                for i, f in enumerate((p, q)):
                    delta = theta[name][i] - anchor[name][i]
                    value += 0.5 * LAM * float(np.sum(f * delta ** 2))
                    grads[name][i] += LAM * f * delta
    return value, grads


@pytest.mark.parametrize("curvature,mode", [("diagonal", "separate"), ("diagonal", "online"),
                                            ("kfac", "separate")])
def test_each_head_consolidates_into_one_ewc(curvature, mode):
    full, heads = two_heads()
    ewc = fastewc.EWC(full, lam=LAM, mode=mode, gamma=GAMMA if mode == "online" else 1.0,
                      curvature=curvature)
    tasks = []
    for seed, head in enumerate(("ha", "hb")):
        perturb(full, seed)                             # stand-in for training on the task
        x, y = head_data(head, seed)
        tasks.append(reference_task(full, head, x, y, curvature))
        ewc.consolidate((x, y), loss=LOSS, model=heads[head])
    assert ewc.num_tasks == 2
    perturb(full, 7)
    want_value, want_grads = reference_penalty(weights(full), tasks, mode, curvature)
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    got = dict(zip([v.path for v in full.trainable_variables], tape.gradient(value, full.trainable_variables)))
    assert_close(value, want_value, rtol=1e-4)
    for name, (g_kernel, g_bias) in want_grads.items():
        assert_close(got[f"{name}/kernel"], g_kernel, rtol=1e-4)
        assert_close(got[f"{name}/bias"], g_bias, rtol=1e-4)


def test_add_task_with_a_sub_model_keeps_the_other_head_exactly():
    """add_task(fisher, model=sub): F = 0 off the sub-model leaves the other head's A, c and
    penalty term exactly as they were (separate mode)."""
    full, heads = two_heads()
    ewc = fastewc.EWC(full, lam=LAM)
    x, y = head_data("ha", 0)
    ewc.consolidate((x, y), loss=LOSS, model=heads["ha"])
    before = ewc.state()
    perturb(full, 1)
    ewc.add_task([np.ones(v.shape, np.float32) for v in heads["hb"].trainable_variables], model=heads["hb"])
    after = ewc.state()
    for key in ("ha/kernel", "ha/bias"):
        np.testing.assert_array_equal(after[key][0], before[key][0])
        np.testing.assert_array_equal(after[key][1], before[key][1])
    np.testing.assert_array_equal(after["hb/kernel"][0], np.ones((5, 2), np.float32))


def test_a_model_that_is_not_a_sub_model_raises_and_leaves_the_state():
    full, heads = two_heads()
    ewc = fastewc.EWC(full, lam=LAM)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="stranger")])
    x, y = head_data("hb", 0)
    message = (r"`model` must be a sub-model of this EWC's model '.*', built on its layers .*"
               r"Received: model '.*', whose trainable variable '.*stranger/kernel' is not a trainable "
               r"variable of")
    with pytest.raises(ValueError, match=message):
        ewc.consolidate((x, y), loss=LOSS, model=other)
    with pytest.raises(ValueError, match=message):
        ewc.add_task([np.ones(v.shape, np.float32) for v in other.trainable_variables], model=other)
    assert ewc.num_tasks == 0
    assert all(not a.any() for a, _ in ewc.state().values())


def test_errors_advise_the_sub_model_and_say_tracks():
    """The multi-output error names the API that works; moving the EWC onto one head says
    the EWC tracks the other head's variables (never consolidated: not 'consolidated')."""
    full, heads = two_heads()
    ewc = fastewc.EWC(full, lam=LAM)
    x, y = head_data("ha", 0)
    with pytest.raises(ValueError, match=r"must have one output for a Fisher.*"
                                         r"ewc\.consolidate\(data, loss=\.\.\., model=keras\.Model\(model\.inputs, "
                                         r"model\.outputs\[i\]\)\)"):
        ewc.consolidate((x, y), loss=LOSS)
    ewc.consolidate((x, y), loss=LOSS, model=heads["ha"])
    with pytest.raises(ValueError, match=r"EWC state tracks variable 'hb/kernel'.*Every variable the EWC "
                                         r"tracks must stay in its model.*model=keras\.Model") as info:
        ewc.model = heads["ha"]
    assert "consolidated" not in str(info.value)
    assert ewc.model is full
