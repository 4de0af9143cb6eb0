"""Writes tests/data/landed_ckpt/: a checkpoint of the landed (pre-issue-26) code."""
import sys
import keras, numpy as np, tensorflow as tf, fastewc
out = sys.argv[1]
LOG = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                          keras.layers.Dense(3, name="d2")])
rng = np.random.default_rng(0)
kfac = fastewc.EWC(model, lam=2.0, curvature="kfac")
diag = fastewc.EWC(model, lam=3.0)
for t in range(2):
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    kfac.consolidate((x, y), loss=LOG)
    diag.consolidate((x, y), loss=LOG)
    for v in model.trainable_variables:
        v.assign(v + 0.2 * rng.normal(size=v.shape).astype("float32"))
tf.train.Checkpoint(model=model, kfac=kfac, diag=diag).write(out + "/ckpt")
expected = {"weights": None}
arrays = {f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
for k, (a, mu) in diag.state().items():
    arrays[f"diag|{k}|a"], arrays[f"diag|{k}|mu"] = a, mu
for k, (a, mu) in kfac.state().items():
    arrays[f"kfacdiag|{k}|a"], arrays[f"kfacdiag|{k}|mu"] = a, mu
for (kernel, bias), terms in kfac.kronecker_state().items():
    for t, term in enumerate(terms):
        for field, value in zip(("coef", "a", "g", "anchor"), term):
            arrays[f"kfac|{kernel}|{bias}|{t}|{field}"] = value
arrays["diag_const"] = np.float64(diag._const.numpy())
np.savez(out + "/expected.npz", **arrays)
print(kfac.num_tasks, float(kfac.penalty()), float(diag.penalty()))
