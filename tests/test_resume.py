"""Resuming an EWCModel from its files (issue 26, item 10): ``save`` (``.keras``) and
``save_weights`` (``.weights.h5``) -- what ``keras.callbacks.ModelCheckpoint`` calls with
``save_weights_only`` False / True -- keep the weights, the optimizer's state (Adam's
moments, the step count) and the EWC state.  Train, save, load in a NEW process, train on:
the result equals training without the interruption."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import fastewc

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
Y = np.arange(16) % 3


def build():
    keras.utils.set_random_seed(1)
    # named layers: the EWC state is matched by variable path (automatic names would
    # depend on how many models the process built before)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh", name="hidden"),
                              keras.layers.Dense(3, name="out")])
    wrapped = fastewc.EWCModel(model, fastewc.EWC(model, lam=3.0))
    wrapped.compile(optimizer=keras.optimizers.Adam(0.05), loss=LOSS)
    return wrapped


def trained(epochs, wrapped=None):
    wrapped = wrapped or build()
    if wrapped.ewc.num_tasks == 0:
        wrapped.ewc.consolidate((X, Y), loss=LOSS, jit_compile=False)
    wrapped.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return wrapped


def snapshot(wrapped):
    return {"weights": [v.numpy().tolist() for v in wrapped.inner_model.weights],
            "optimizer": [v.numpy().tolist() for v in wrapped.optimizer.variables],
            "ewc": [[a.tolist(), mu.tolist()] for a, mu in wrapped.ewc.state().values()],
            "num_tasks": wrapped.ewc.num_tasks, "lam": wrapped.ewc.lam}


RESUME = textwrap.dedent("""
    import json, sys
    import keras
    sys.path.insert(0, "tests")
    import test_resume as t
    out = {}
    # save(): keras.models.load_model gives the compiled wrapper back
    out["keras"] = t.snapshot(t.trained(2, keras.models.load_model(sys.argv[1])))
    # save_weights(): load_weights into a wrapper built and compiled as before, in place
    wrapped = t.build()
    ewc = wrapped.ewc
    wrapped.load_weights(sys.argv[2])
    assert wrapped.ewc is ewc
    out["weights"] = t.snapshot(t.trained(2, wrapped))
    print(json.dumps(out))
""")


def test_save_and_save_weights_resume_in_a_new_process_as_if_never_interrupted(tmp_path):
    reference = snapshot(trained(4))                        # no interruption
    wrapped = trained(2)
    checkpoints = [keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras")),
                   keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.weights.h5"),
                                                   save_weights_only=True)]
    for callback in checkpoints:                            # what fit's callback calls
        callback.set_model(wrapped)
        callback.on_epoch_end(1, logs={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.keras", "ckpt.weights.h5"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path / "ckpt.keras"),
                           str(tmp_path / "ckpt.weights.h5")],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    for route in ("keras", "weights"):
        got = resumed[route]
        assert (got["num_tasks"], got["lam"]) == (reference["num_tasks"], reference["lam"])
        for key in ("weights", "optimizer", "ewc"):
            for a, b in zip(np.asarray(got[key], dtype=object).ravel(),
                            np.asarray(reference[key], dtype=object).ravel()):
                np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{route}: {key}")


def test_load_weights_without_ewc_state_raises_before_assigning(tmp_path):
    wrapped = trained(1)
    path = tmp_path / "inner.weights.h5"
    wrapped.inner_model.save_weights(path)                  # Keras' file: no EWC state
    fresh = build()
    before = [v.numpy() for v in fresh.weights]
    with pytest.raises(ValueError, match=r"`filepath` holds no EWC state"):
        fresh.load_weights(path)
    for v, b in zip(fresh.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
