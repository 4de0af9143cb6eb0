"""Why KFAC-EWC's λ is smaller, and why it forgets less: the Kronecker and diagonal EWC
quadratic forms on the demo's model, measured.

    python -m fastewc.demo.penalty_shape [--seed 0]

Trains the demo's MLP on permuted-digit task 1 (the demo's batches, 5 epochs, on the 80 %
training part of :func:`fastewc.demo.scenarios.with_validation`), takes the exact diagonal
Fisher F and the Kronecker factors (A, G) at θ₁, then fine-tunes on task 2 without a
penalty and compares, per Dense layer (kernel and bias as one block W̄):

* the traces, Σ F against tr(A)·tr(G), and the quadratic forms over random directions
  (their mean is the trace): how the two approximations compare on average;
* the quadratic forms of the drift Δ = θ₂ − θ₁ that task 2 actually makes,
  Σ F Δ² against Σ Δ ⊙ (A Δ G): how hard each resists the moves that matter;
* A's top eigenvalue against its mean diagonal entry (A = E[āāᵀ] is uncentred).
"""
import argparse

import numpy as np


def measure(seed=0, epochs=5, log=print):
    import keras
    import fastewc
    from fastewc.demo import run, scenarios

    sc = scenarios.with_validation(scenarios.load_scenario("permuted", 2, seed), 0.2, seed)
    keras.utils.set_random_seed(seed)
    model = run.build_model(scenarios.INPUT_DIM, (256, 256), sc.num_classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    B = 32
    nb = len(sc.tasks[0].y_train) // B
    step = fastewc.make_train_step(model, keras.optimizers.Adam(1e-3), loss, steps_per_call=nb,
                                   jit_compile=False)

    def train(t):
        task = sc.tasks[t]
        for e in range(epochs):
            idx = np.random.default_rng([seed, t, e]).permutation(len(task.y_train))[:nb * B]
            step(task.x_train[idx].reshape(nb, B, -1), task.y_train[idx].reshape(nb, B))

    train(0)
    data = (sc.tasks[0].x_train, sc.tasks[0].y_train)
    theta1 = [v.numpy().copy() for v in model.trainable_variables]
    diag = [np.asarray(f, np.float64) for f in
            fastewc.fisher_diagonal(model, data, loss=loss, kind="exact")]
    kfac = fastewc.kfac_fisher(model, data, loss=loss, kind="exact")
    train(1)
    delta = [v.numpy() - a for v, a in zip(model.trainable_variables, theta1)]
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    rng = np.random.default_rng(seed)
    rows, total = [], {"q_diag": 0.0, "q_kfac": 0.0, "trace_diag": 0.0, "trace_kfac": 0.0}
    for block in kfac.blocks:
        ids = [index[id(v)] for v in block.variables]
        stack = lambda parts: np.vstack([parts[ids[0]].reshape(-1, parts[ids[0]].shape[-1])] +  # noqa: E731
                                        [parts[i][None] for i in ids[1:]]).astype(np.float64)
        dw, fd = stack(delta), stack(diag)
        a, g = np.asarray(block.a, np.float64), np.asarray(block.g, np.float64)
        r = rng.normal(size=(20,) + dw.shape)
        eig_a = np.linalg.eigvalsh(a)
        row = {"layer": block.layer, "q_diag": float(np.sum(fd * dw ** 2)),
               "q_kfac": float(np.sum(dw * (a @ dw @ g))),
               "trace_diag": float(fd.sum()), "trace_kfac": float(np.trace(a) * np.trace(g)),
               "random_ratio": float(np.mean([np.sum(x * (a @ x @ g)) for x in r]) /
                                     np.mean([np.sum(fd * x ** 2) for x in r])),
               "a_top_over_mean_diag": float(eig_a[-1] / np.mean(np.diag(a)))}
        for k in total:
            total[k] += row[k]
        rows.append(row)
        log(f"{row['layer']:>8}: drift q_kfac / q_diag = {row['q_kfac'] / row['q_diag']:6.1f}; "
            f"trace kfac / diag = {row['trace_kfac'] / row['trace_diag']:.2f}; random directions "
            f"kfac / diag = {row['random_ratio']:.2f}; A's top eigenvalue / mean diagonal = "
            f"{row['a_top_over_mean_diag']:.0f}")
    log(f"   model: drift q_kfac / q_diag = {total['q_kfac'] / total['q_diag']:.1f}; "
        f"trace kfac / diag = {total['trace_kfac'] / total['trace_diag']:.2f}")
    return {"layers": rows, "total": total}


def main(argv=None):
    from fastewc.__main__ import _int_at_least, _seed
    p = argparse.ArgumentParser(prog="python -m fastewc.demo.penalty_shape", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--epochs", type=_int_at_least(1), default=5)
    args = p.parse_args(argv)
    return measure(args.seed, args.epochs)


if __name__ == "__main__":
    main()
