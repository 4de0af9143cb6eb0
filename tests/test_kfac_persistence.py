"""A curvature="kfac" EWC saved and loaded (.npz, version 2) and checkpointed
(tf.train.Checkpoint): the Kronecker terms, damping and kfac_sum come back, the penalty is
the same, and a file that does not fit the model raises before anything is built."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import ewc_file

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(units=4):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(units, activation="tanh", name="d1"),
                             keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])


def _consolidated(mode="online", kfac_sum="exact", tasks=2):
    rng = np.random.default_rng(0)
    model = _model()
    ewc = fastewc.EWC(model, lam=2.0, curvature="kfac", mode=mode, gamma=0.5 if mode == "online" else 1.0,
                      kfac_sum=kfac_sum, damping=0.01)
    for _ in range(tasks):
        x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
        ewc.consolidate((x, y), loss=LOGITS)
        for v in model.trainable_variables:
            v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
    return model, ewc


def _same_terms(left, right):
    assert left.keys() == right.keys()
    for block in left:
        assert len(left[block]) == len(right[block])
        for a, b in zip(left[block], right[block]):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode,kfac_sum", [("separate", "exact"), ("online", "nearest")])
def test_save_load_round_trip(tmp_path, mode, kfac_sum):
    model, ewc = _consolidated(mode, kfac_sum)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    twin = _model()
    twin.set_weights(model.get_weights())
    loaded = fastewc.EWC.load(path, twin)
    assert (loaded.curvature, loaded.kfac_sum, loaded.damping, loaded.mode) == ("kfac", kfac_sum, 0.01, mode)
    _same_terms(loaded.kronecker_state(), ewc.kronecker_state())
    assert float(loaded.penalty()) == pytest.approx(float(ewc.penalty()), rel=1e-6)


def test_checkpoint_restores_the_terms(tmp_path):
    model, ewc = _consolidated("separate", "exact", tasks=3)
    path = tf.train.Checkpoint(ewc=ewc).save(str(tmp_path / "ckpt"))
    for curvature in ("kfac", "diagonal"):        # the checkpoint's curvature wins, as its mode does
        twin = _model()
        twin.set_weights(model.get_weights())
        restored = fastewc.EWC(twin, lam=1.0, curvature=curvature)
        tf.train.Checkpoint(ewc=restored).restore(path).assert_consumed()
        assert restored.curvature == "kfac" and restored.num_tasks == 3
        _same_terms(restored.kronecker_state(), ewc.kronecker_state())
        assert float(restored.penalty()) == pytest.approx(float(ewc.penalty()), rel=1e-6)


def test_diagonal_files_stay_version_1(tmp_path):
    model = _model()
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as npz:
        assert json.loads(npz["header"].tobytes().decode())["version"] == 1


def test_a_file_for_another_kernel_shape_raises(tmp_path):
    _, ewc = _consolidated()
    ewc.save(tmp_path / "e.npz")
    other = _model(units=6)
    with pytest.raises(ValueError, match=r"d1/kernel"):
        fastewc.EWC.load(tmp_path / "e.npz", other)


def test_a_flipped_bit_in_a_term_is_caught(tmp_path):
    _, ewc = _consolidated()
    path = tmp_path / "e.npz"
    ewc.save(path)
    with np.load(path) as npz:
        arrays = {name: npz[name].copy() for name in npz.files}
    arrays["kfacg_0"].view(np.uint32)[0, 0] ^= 1
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="checksum"):
        ewc_file.read(path)
    os.remove(path)
