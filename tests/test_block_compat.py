"""Nothing lost with the curvature blocks (issue 25, item 6): EWC files (versions 1 and 2)
and a checkpoint written by the code before them (commit b98547c,
``tests/data/make_landed_files.py``) load, and continue identically: the penalty and its
gradient at the saved weights against a float64 NumPy evaluation of the saved state, and
after one more task against the float64 merge (separate, online; exact Kronecker sums) and
against what the old code computed (every mode, ``kfac_sum="nearest"`` included)."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc

HERE = os.path.join(os.path.dirname(__file__), "data", "landed_files")
SETTINGS = {"diag": dict(lam=3.0),
            "diagonline": dict(lam=1.5, mode="online", gamma=0.7),
            "kfac": dict(lam=2.0, curvature="kfac"),
            "kfaconline": dict(lam=2.5, curvature="kfac", mode="online", gamma=0.8, damping=1e-2),
            "nearest": dict(lam=1.0, curvature="kfac", mode="online", gamma=0.6, kfac_sum="nearest",
                            damping=1e-3)}
LAYERS = {"d1": ("d1/kernel", "d1/bias"), "d2": ("d2/kernel", "d2/bias")}


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(HERE, "expected.npz")) as npz:
        return {name: npz[name] for name in npz.files}


def _model():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])


def _key(model, v):
    """EWC's key of ``v``: its path without the model's name."""
    return v.path[len(model.name) + 1:] if v.path.startswith(model.name + "/") else v.path


def _set_weights(model, expected, prefix):
    for i, v in enumerate(model.trainable_variables):
        v.assign(expected[f"{prefix}{i}"])


def _saved(expected, name, when):
    """(state {key: (A, μ)}, terms {(kernel, bias): [[c, A, G, W̄*]]}, c) as float64."""
    state, terms = {}, {}
    for key, value in expected.items():
        parts = key.split("|")
        if parts[:2] != [name, when]:
            continue
        if parts[2] == "state":
            state.setdefault(parts[3], {})[parts[4]] = value.astype(np.float64)
        elif parts[2] == "terms":
            block = terms.setdefault((parts[3], parts[4] or None), {})
            block.setdefault(int(parts[5]), {})[parts[6]] = value.astype(np.float64)
    state = {k: (v["a"], v["mu"]) for k, v in state.items()}
    terms = {b: [[ts[t][f] for f in ("coef", "a", "g", "anchor")] for t in sorted(ts)] for b, ts in terms.items()}
    return state, terms, float(expected[f"{name}|{when}|const"])


def _damped(a, g, damping):
    ta, tg = np.trace(a) / len(a), np.trace(g) / len(g)
    pi = np.sqrt(ta / tg) if ta > 0 and tg > 0 and np.isfinite(ta / tg) else 1.0
    root = np.sqrt(damping)
    return a + pi * root * np.eye(len(a)), g + root / pi * np.eye(len(g))


def _reference(model, state, terms, const, lam, damping):
    """Penalty and gradients, float64 NumPy: λ/2 [Σ A (θ − μ)² + c] + λ/2 Σ_t c_t ⟨ΔW̄, A ΔW̄ G⟩."""
    paths = [_key(model, v) for v in model.trainable_variables]
    theta = {p: v.numpy().astype(np.float64) for p, v in zip(paths, model.trainable_variables)}
    value = 0.5 * lam * const
    grads = {p: np.zeros_like(t) for p, t in theta.items()}
    for key, (a, mu) in state.items():
        value += 0.5 * lam * np.sum(a * (theta[key] - mu) ** 2)
        grads[key] += lam * a * (theta[key] - mu)
    for (kernel, bias), block in terms.items():
        w = np.concatenate([theta[kernel].reshape(-1, theta[kernel].shape[-1]), theta[bias][None]])
        for c, a, g, anchor in block:
            a_d, g_d = _damped(a, g, damping)
            m = a_d @ (w - anchor) @ g_d
            value += 0.5 * lam * c * np.sum((w - anchor) * m)
            grads[kernel] += lam * c * m[:-1].reshape(theta[kernel].shape)
            grads[bias] += lam * c * m[-1]
    return value, [grads[p] for p in paths]


def _next_task(expected, name, model, state, terms, const):
    """The float64 state after the fixture's next task (separate; online with exact sums)."""
    settings = SETTINGS[name]
    online, gamma = settings.get("mode") == "online", settings.get("gamma", 1.0)
    kfac = settings.get("curvature") == "kfac"
    covered = {k for block in LAYERS.values() for k in block} if kfac else set()
    new_state = {}
    for i, v in enumerate(model.trainable_variables):
        key = _key(model, v)
        a, mu = state[key]
        theta = expected[f"w3_{i}"].astype(np.float64)
        f = (np.zeros_like(theta) if key in covered else
             expected[f"task|kdiag{i}" if kfac else f"task|diag{i}"].astype(np.float64))
        if online:
            new_state[key] = (gamma * a + f, theta)
            continue
        a_new = a + f
        safe = np.where(a_new > 0, a_new, 1.0)
        new_state[key] = (a_new, np.where(a > 0, mu + np.where(a_new > 0, f / safe, 1.0) * (theta - mu), theta))
        const += float(np.sum(np.where(a_new > 0, a * f / safe, 0.0) * (mu - theta) ** 2))
    w3 = {_key(model, v): expected[f"w3_{i}"].astype(np.float64) for i, v in enumerate(model.trainable_variables)}
    new_terms = {}
    for layer, (kernel, bias) in LAYERS.items() if kfac else ():
        anchor = np.concatenate([w3[kernel].reshape(-1, w3[kernel].shape[-1]), w3[bias][None]])
        old = [[gamma * c, a, g, anchor] for c, a, g, _ in terms[(kernel, bias)]] if online else terms[(kernel, bias)]
        new_terms[(kernel, bias)] = old + [[1.0, expected[f"task|{layer}|a"].astype(np.float64),
                                            expected[f"task|{layer}|g"].astype(np.float64), anchor]]
    return new_state, new_terms, const


def _task(expected, model, ewc):
    if ewc.curvature != "kfac":
        return [expected[f"task|diag{i}"] for i in range(len(model.trainable_variables))]
    variables = {_key(model, v): v for v in model.trainable_variables}
    blocks = [fastewc.KroneckerBlock(layer, tuple(variables[k] for k in keys),
                                     tf.constant(expected[f"task|{layer}|a"]), tf.constant(expected[f"task|{layer}|g"]))
              for layer, keys in LAYERS.items()]
    covered = {k for keys in LAYERS.values() for k in keys}
    diagonal = [None if _key(model, v) in covered else tf.constant(expected[f"task|kdiag{i}"])
                for i, v in enumerate(model.trainable_variables)]
    return fastewc.KroneckerFisher(blocks, diagonal, list(model.trainable_variables))


def _assert_penalty(ewc, want_value, want_grads, rtol=2e-5):
    value, grads = ewc.penalty_and_gradients()
    np.testing.assert_allclose(float(value), want_value, rtol=rtol, atol=1e-6)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=1e-5)


def _loaded(name, source, expected):
    model = _model()
    if source == "file":
        ewc = fastewc.EWC.load(os.path.join(HERE, f"{name}.npz"), model)
        _set_weights(model, expected, "w")
    else:
        ewc = fastewc.EWC(model, **SETTINGS[name])
        tf.train.Checkpoint(model=model, **{name: ewc}).read(os.path.join(HERE, "ckpt")).expect_partial()
    return model, ewc


@pytest.mark.parametrize("source", ["file", "checkpoint"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_landed_files_and_checkpoints_load_and_continue_identically(name, source, expected):
    model, ewc = _loaded(name, source, expected)
    settings = SETTINGS[name]
    lam, damping = settings["lam"], settings.get("damping", 0.0)
    assert (ewc.lam, ewc.mode, ewc.curvature, ewc.num_tasks) == (
        lam, settings.get("mode", "separate"), settings.get("curvature", "diagonal"), 2)
    state, terms, const = _saved(expected, name, "saved")
    assert sorted(ewc.state()) == sorted(state) and sorted(ewc.kronecker_state()) == sorted(terms)
    _assert_penalty(ewc, *_reference(model, state, terms, const, lam, damping))
    _set_weights(model, expected, "w3_")
    ewc.add_task(_task(expected, model, ewc))
    _set_weights(model, expected, "w4_")
    # Identically: as the code that wrote them continued ...
    _assert_penalty(ewc, float(expected[f"{name}|after|value"]),
                    [expected[f"{name}|after|grad{i}"] for i in range(len(model.trainable_variables))])
    if settings.get("kfac_sum") == "nearest":
        return
    # ... and as the float64 merge of the saved state with the task.
    want = _next_task(expected, name, model, state, terms, const)
    _assert_penalty(ewc, *_reference(model, *want, lam, damping))
