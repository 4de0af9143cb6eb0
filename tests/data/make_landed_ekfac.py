"""Writes tests/data/landed_ekfac/: an EWC file (version 2) and a checkpoint of a
``curvature="ekfac"`` EWC (separate mode, the only one it had) written by the code before
EKFAC's online mode and damping (commit 4af25ff), with what that code computed after one
more task (tests/test_ekfac.py); with ``online``, tests/data/landed_ekfac_online/: the same
of an online EWC (γ = 0.7) written by the code before the online state kept its factor
sums (commit 3ec3c05).

    python tests/data/make_landed_ekfac.py tests/data/landed_ekfac             # at 4af25ff
    python tests/data/make_landed_ekfac.py tests/data/landed_ekfac_online online   # at 3ec3c05
"""
import sys

import keras
import numpy as np
import tensorflow as tf

import fastewc
from fastewc.blocks.ekfac import EKFAC, EKFACBlock, EKFACFisher

out = sys.argv[1]
settings = dict(mode="online", gamma=0.7) if sys.argv[2:] == ["online"] else {}
LOG = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                          keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])
rng = np.random.default_rng(0)
ewc = fastewc.EWC(model, lam=2.0, curvature="ekfac", **settings)
for t in range(2):
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    ewc.consolidate((x, y), loss=LOG, jit_compile=False)
    for v in model.trainable_variables:
        v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))
arrays = {f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
ewc.save(f"{out}/ekfac.npz")
tf.train.Checkpoint(model=model, ewc=ewc).write(out + "/ckpt")


def record(prefix):
    for k, (a, mu) in ewc.state().items():
        arrays[f"{prefix}|state|{k}|a"], arrays[f"{prefix}|state|{k}|mu"] = a, mu
    for (kernel, bias), terms in EKFAC.snapshot(ewc._state.variables(EKFAC)).items():
        for t, term in enumerate(terms):
            for field, value in zip(("u_a", "u_g", "s", "anchor"), term):
                arrays[f"{prefix}|terms|{kernel}|{bias or ''}|{t}|{field}"] = value
    arrays[f"{prefix}|const"] = np.float64(ewc._const.numpy())
    value, grads = ewc.penalty_and_gradients()
    arrays[f"{prefix}|value"] = np.float64(value.numpy())
    for i, g in enumerate(grads):
        arrays[f"{prefix}|grad{i}"] = g.numpy()


record("saved")
# The next task: an EKFACFisher of random orthogonal bases and S >= 0, and a diagonal for
# the LayerNormalization, at new weights.
for v in model.trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
for i, v in enumerate(model.trainable_variables):
    arrays[f"w3_{i}"] = v.numpy()
blocks = []
for name, rows, units in (("d1", 6, 4), ("d2", 5, 3)):
    u_a, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    u_g, _ = np.linalg.qr(rng.normal(size=(units, units)))
    s = rng.uniform(0, 2, (rows, units))
    arrays[f"task|{name}|u_a"], arrays[f"task|{name}|u_g"], arrays[f"task|{name}|s"] = (
        np.float32(u_a), np.float32(u_g), np.float32(s))
    layer = model.get_layer(name)
    blocks.append(EKFACBlock(name, (layer.kernel, layer.bias), *(tf.constant(np.float32(m)) for m in (u_a, u_g, s))))
diagonal = [None, None, tf.constant(rng.uniform(0, 2, (4,)).astype("float32")),
            tf.constant(rng.uniform(0, 2, (4,)).astype("float32")), None, None]
for i, f in enumerate(diagonal):
    if f is not None:
        arrays[f"task|diag{i}"] = f.numpy()
ewc.add_task(EKFACFisher(blocks, diagonal, list(model.trainable_variables)))
for v in model.trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
for i, v in enumerate(model.trainable_variables):
    arrays[f"w4_{i}"] = v.numpy()
record("after")
np.savez(out + "/expected.npz", **arrays)
print(float(ewc.penalty()))
