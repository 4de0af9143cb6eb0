"""Issue 26 items 3 and 9: a tf.train.Checkpoint restore gives exactly the checkpoint's
EWC state (terms and variables created after it are dropped), through ``read``,
``restore`` and a ``CheckpointManager``; a checkpoint that does not fit the model raises
before any EWC variable is written; a checkpoint written by the code before the staging
restore (``data/landed_ckpt``, made by ``data/make_landed_ckpt.py`` at e42b746) still
restores.  References: float64 NumPy (np.kron for the Kronecker terms)."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc

from conftest import assert_close

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAM = 2.0
LANDED = os.path.join(os.path.dirname(__file__), "data", "landed_ckpt")


def _model(units=3):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.Dense(units, name="d2")])


def _weights(model):
    """{EWC key (the path without the model's name): float64 value}."""
    return {v.path.removeprefix(model.name + "/"): v.numpy().astype(np.float64)
            for v in model.trainable_variables}


def _kfac_reference(model, terms):
    """½λ Σ_blocks Σ_terms c · vec(W̄ − W̄*)ᵀ (A ⊗ G) vec(W̄ − W̄*), W̄ = [kernel; bias]."""
    now, total = _weights(model), 0.0
    for (kernel, bias), block_terms in terms.items():
        w = np.vstack([now[kernel], now[bias][None]])
        for coef, a, g, anchor in block_terms:
            delta = (w - anchor.astype(np.float64)).reshape(-1)
            total += float(coef) * delta @ np.kron(a.astype(np.float64), g.astype(np.float64)) @ delta
    return 0.5 * LAM * total


def _diagonal_reference(model, state, const, lam):
    """½λ Σ_i A_i (θ_i − μ_i)² + ½λ c over the tracked paths of ``state``."""
    now = _weights(model)
    return 0.5 * lam * (sum(float(np.sum(a.astype(np.float64) * (now[p] - mu) ** 2))
                            for p, (a, mu) in state.items()) + const)


def _task(ewc, model, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    ewc.consolidate((x, y), loss=LOGITS)
    for v in model.trainable_variables:
        v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))


def _restore(how, checkpoint, path):
    if how == "read":
        checkpoint.read(path).assert_consumed()
    else:                                          # restore and CheckpointManager's path
        checkpoint.restore(path).assert_consumed()


def _copies(terms):
    return {block: [tuple(np.array(v) for v in term) for term in block_terms]
            for block, block_terms in terms.items()}


def _assert_terms_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for block in expected:
        assert len(actual[block]) == len(expected[block]), block
        for got, want in zip(actual[block], expected[block]):
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)


# -- item 3: exactly the checkpoint's state -------------------------------------------------
@pytest.mark.parametrize("how", ["read", "restore", "manager"])
def test_kfac_restore_drops_the_terms_added_after_the_checkpoint(tmp_path, how):
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac")
    _task(ewc, model, 1)
    checkpoint = tf.train.Checkpoint(ewc=ewc)
    if how == "manager":
        manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=3)
        path = manager.save()
    elif how == "restore":
        path = checkpoint.save(str(tmp_path / "ckpt"))
    else:
        path = checkpoint.write(str(tmp_path / "ckpt"))
    saved_terms = _copies(ewc.kronecker_state())
    _task(ewc, model, 2)
    assert ewc.num_tasks == 2 and all(len(t) == 2 for t in ewc.kronecker_state().values())
    if how == "manager":
        manager.save()                                        # a later one, not restored
        assert manager.latest_checkpoint != path
    _restore(how, checkpoint, path)
    assert ewc.num_tasks == 1
    _assert_terms_equal(ewc.kronecker_state(), saved_terms)
    assert_close(float(ewc.penalty()), _kfac_reference(model, saved_terms))


def test_diagonal_restore_drops_a_head_added_after_the_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    head_a = keras.layers.Dense(3, name="a")(hidden)
    ewc = fastewc.EWC(keras.Model(inp, head_a), lam=LAM)
    rng = np.random.default_rng(0)

    def add_task():
        variables = ewc.model.trainable_variables
        ewc.add_task([rng.uniform(0.5, 2.0, v.shape).astype("float32") for v in variables])
        for v in ewc.model.trainable_variables:
            v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))

    add_task()
    checkpoint = tf.train.Checkpoint(ewc=ewc)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    saved, saved_const = ewc.state(), float(ewc._const.numpy())
    ewc.model = keras.Model(inp, [head_a, keras.layers.Dense(2, name="b")(hidden)])
    add_task()
    assert ewc.state()["b/kernel"][0].any()                   # task 2's Fisher of the new head
    checkpoint.read(path)
    assert ewc.num_tasks == 1
    state = ewc.state()
    for key, (a, mu) in saved.items():
        np.testing.assert_array_equal(state[key][0], a)
        np.testing.assert_array_equal(state[key][1], mu)
    for key in ("b/kernel", "b/bias"):                        # as a new EWC tracks it: zero
        assert not state[key][0].any() and not state[key][1].any()
    assert_close(float(ewc.penalty()), _diagonal_reference(ewc.model, saved, saved_const, LAM))


def test_restore_twice_and_into_a_fresh_ewc_give_the_same_state(tmp_path):
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac", mode="online", gamma=0.5)
    _task(ewc, model, 1)
    _task(ewc, model, 2)
    path = tf.train.Checkpoint(ewc=ewc).write(str(tmp_path / "ckpt"))
    expected = _copies(ewc.kronecker_state())
    fresh = fastewc.EWC(model, lam=1.0, curvature="kfac")
    for _ in range(2):
        tf.train.Checkpoint(ewc=fresh).read(path).assert_consumed()
        assert (fresh.mode, fresh.gamma, fresh.num_tasks) == ("online", 0.5, 2)
        _assert_terms_equal(fresh.kronecker_state(), expected)
    assert_close(float(fresh.penalty()), _kfac_reference(model, expected))


# -- item 9: validate every shape before assigning any ----------------------------------------
def _everything(ewc):
    return (ewc.num_tasks, float(ewc._const.numpy()), ewc.lam, ewc.state(),
            _copies(ewc.kronecker_state()), ewc.structure_token)


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_a_shape_mismatch_raises_before_any_ewc_variable_is_written(tmp_path, curvature):
    other = _model(units=4)                   # d1 fits; d2 is (4, 4) there, (4, 3) here
    saved = fastewc.EWC(other, lam=5.0, curvature=curvature)
    for seed in (3, 4):
        _task(saved, other, seed)
    path = tf.train.Checkpoint(ewc=saved).write(str(tmp_path / "ckpt"))
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature=curvature)
    _task(ewc, model, 1)
    before = _everything(ewc)
    with pytest.raises(ValueError, match=r"d2/kernel'.*shape \(4, 4\).*shape \(4, 3\)"):
        tf.train.Checkpoint(ewc=ewc).read(path)
    after = _everything(ewc)
    assert after[:3] == before[:3] and after[5] == before[5]
    for key, (a, mu) in before[3].items():
        np.testing.assert_array_equal(after[3][key][0], a)
        np.testing.assert_array_equal(after[3][key][1], mu)
    _assert_terms_equal(after[4], before[4])


# -- checkpoints written before the staging restore -------------------------------------------
def test_a_checkpoint_of_the_landed_code_restores_exactly():
    expected = np.load(os.path.join(LANDED, "expected.npz"))
    model = _model()
    kfac = fastewc.EWC(model, lam=1.0, curvature="kfac")
    diag = fastewc.EWC(model, lam=1.0)
    for seed in (7, 8, 9):                    # more state than the checkpoint: must go
        _task(kfac, model, seed)
        _task(diag, model, seed)
    tf.train.Checkpoint(model=model, kfac=kfac, diag=diag).read(
        os.path.join(LANDED, "ckpt")).assert_consumed()
    for i, v in enumerate(model.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), expected[f"w{i}"])
    assert (kfac.num_tasks, diag.num_tasks, kfac.lam, diag.lam) == (2, 2, 2.0, 3.0)
    terms = {}
    for name in expected.files:
        if name.startswith("kfac|"):
            _, kernel, bias, t, field = name.split("|")
            terms.setdefault((kernel, bias), {}).setdefault(int(t), {})[field] = expected[name]
    terms = {block: [tuple(ts[t][f] for f in ("coef", "a", "g", "anchor")) for t in sorted(ts)]
             for block, ts in terms.items()}
    _assert_terms_equal(kfac.kronecker_state(), terms)
    state = {k: (expected[f"diag|{k}|a"], expected[f"diag|{k}|mu"].astype(np.float64))
             for k in diag.tracked_paths}
    for key, (a, mu) in diag.state().items():
        np.testing.assert_array_equal(a, state[key][0])
    assert_close(float(diag.penalty()), _diagonal_reference(model, state, float(expected["diag_const"]), 3.0))
    assert_close(float(kfac.penalty()), _kfac_reference(model, terms))   # its diagonal part is 0
