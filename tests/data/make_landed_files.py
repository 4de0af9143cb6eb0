"""Writes tests/data/landed_files/: EWC files (versions 1 and 2) and a checkpoint written by
the code before the curvature blocks (issue 25, commit b98547c), with what that code
computed after one more task (tests/test_block_compat.py).

    python tests/data/make_landed_files.py tests/data/landed_files
"""
import sys

import keras
import numpy as np
import tensorflow as tf

import fastewc

out = sys.argv[1]
LOG = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                          keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])
rng = np.random.default_rng(0)
ewcs = {"diag": fastewc.EWC(model, lam=3.0),
        "diagonline": fastewc.EWC(model, lam=1.5, mode="online", gamma=0.7),
        "kfac": fastewc.EWC(model, lam=2.0, curvature="kfac"),
        "kfaconline": fastewc.EWC(model, lam=2.5, curvature="kfac", mode="online", gamma=0.8,
                                  damping=1e-2),
        "nearest": fastewc.EWC(model, lam=1.0, curvature="kfac", mode="online", gamma=0.6,
                               kfac_sum="nearest", damping=1e-3)}
for t in range(2):
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    for ewc in ewcs.values():
        ewc.consolidate((x, y), loss=LOG)
    for v in model.trainable_variables:
        v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))
arrays = {f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
for name, ewc in ewcs.items():
    ewc.save(f"{out}/{name}.npz")
tf.train.Checkpoint(model=model, **ewcs).write(out + "/ckpt")


def record(prefix, ewc):
    for k, (a, mu) in ewc.state().items():
        arrays[f"{prefix}|state|{k}|a"], arrays[f"{prefix}|state|{k}|mu"] = a, mu
    for (kernel, bias), terms in ewc.kronecker_state().items():
        for t, term in enumerate(terms):
            for field, value in zip(("coef", "a", "g", "anchor"), term):
                arrays[f"{prefix}|terms|{kernel}|{bias or ''}|{t}|{field}"] = value
    arrays[f"{prefix}|const"] = np.float64(ewc._const.numpy())
    value, grads = ewc.penalty_and_gradients()
    arrays[f"{prefix}|value"] = np.float64(value.numpy())
    for i, g in enumerate(grads):
        arrays[f"{prefix}|grad{i}"] = g.numpy()


for name, ewc in ewcs.items():
    record(f"{name}|saved", ewc)
# The next task: given Fisher arrays (a diagonal, Kronecker factors) at new weights.
for v in model.trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
for i, v in enumerate(model.trainable_variables):
    arrays[f"w3_{i}"] = v.numpy()
diagonal = [rng.uniform(0, 2, v.shape).astype("float32") for v in model.trainable_variables]
kfac = fastewc.kfac_fisher(model, (x, y), loss=LOG, kind="exact")
for i, f in enumerate(diagonal):
    arrays[f"task|diag{i}"] = f
for block in kfac.blocks:
    arrays[f"task|{block.layer}|a"], arrays[f"task|{block.layer}|g"] = block.a.numpy(), block.g.numpy()
for i, f in enumerate(kfac.diagonal):
    if f is not None:
        arrays[f"task|kdiag{i}"] = f.numpy()
for name, ewc in ewcs.items():
    ewc.add_task(kfac if ewc.curvature == "kfac" else diagonal)
for v in model.trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
for i, v in enumerate(model.trainable_variables):
    arrays[f"w4_{i}"] = v.numpy()
for name, ewc in ewcs.items():
    record(f"{name}|after", ewc)
np.savez(out + "/expected.npz", **arrays)
print({name: float(ewc.penalty()) for name, ewc in ewcs.items()})
