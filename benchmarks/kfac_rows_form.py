"""ASDL's low-memory Kronecker factor (``SHAPE_SWIFT_KRON``) on the reference CNN's
Dense(9216 → 128) at N = 256 rows: forming A = XᵀX (what ``contract.row_gram`` does)
against keeping the rows X, and the EWC penalty value and gradient, P = tr(ΔWᵀ A ΔW G),
∇ = 2 A ΔW G, from A or from the rows (A ΔW = Xᵀ(XΔW)).  Interleaved medians:

    .venv/bin/python -m benchmarks.kfac_rows_form
"""
import statistics
import time

import numpy as np
import tensorflow as tf


@tf.function(autograph=False)
def form_a(x):
    return tf.matmul(x, x, transpose_a=True)


@tf.function(autograph=False)
def penalty_a(a, dw, g):
    adwg = tf.matmul(tf.matmul(a, dw), g)
    return tf.reduce_sum(dw * adwg), 2.0 * adwg


@tf.function(autograph=False)
def penalty_rows(x, dw, g):
    adwg = tf.matmul(x, tf.matmul(tf.matmul(x, dw), g), transpose_a=True)
    return tf.reduce_sum(dw * adwg), 2.0 * adwg


def main(rounds=9):
    rng = np.random.default_rng(0)
    n, d, u = 256, 9217, 128
    x = tf.constant((rng.normal(size=(n, d)) / np.sqrt(n)).astype(np.float32))
    a = form_a(x)
    g = tf.constant((np.eye(u) + 0.01).astype(np.float32))
    dw = tf.constant((rng.normal(size=(d, u)) * 1e-2).astype(np.float32))
    members = {"form A (row_gram's matmul)": lambda: form_a(x).numpy()[0, 0],
               "penalty+grad from A": lambda: penalty_a(a, dw, g)[0].numpy(),
               "penalty+grad from rows": lambda: penalty_rows(x, dw, g)[0].numpy()}
    va, vr = penalty_a(a, dw, g)[0].numpy(), penalty_rows(x, dw, g)[0].numpy()
    print("penalty from A", va, "from rows", vr, "rel diff", abs(va - vr) / abs(va))
    for f in members.values():
        f()
        f()
    times = {k: [] for k in members}
    for r in range(rounds):
        for k in (list(members) if r % 2 else list(members)[::-1]):
            start = time.perf_counter()
            members[k]()
            times[k].append(time.perf_counter() - start)
    for k, v in times.items():
        print(f"{k}: {statistics.median(v) * 1e3:.1f} ms")
    print("floats: A", d * d, "rows", n * d, "ratio", d * d / (n * d))


if __name__ == "__main__":
    main()
