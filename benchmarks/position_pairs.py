"""Pairs of positions against per-example gradients: where a rule should switch.

For rows (N, L, I) and deltas (K, N, L, F) a rule needs Σ_kn w_kn (Σ_l rows_nl ⊗ δ_knl)².
Per-example: K·N (I × F) gradients, squared and summed (what the conv rule's K > 1 path
does: one batched matmul per cotangent).  Pairs:
:func:`fastewc.rules._common.position_pair_square_sum`.  Both compiled without XLA (the
factored engine's CPU default for convolutions), side by side, medians of interleaved
rounds after a warm-up; the two results are checked against each other.

    .venv/bin/python -m benchmarks.position_pairs        # about 2 min here

``fastewc.rules._common.use_position_pairs`` takes its thresholds from this table.
"""
import time

import numpy as np
import tensorflow as tf

from fastewc.rules._common import position_pair_square_sum, weighted_rows

SHAPES = [(1024, 256), (2304, 256), (512, 2048)]     # (I, F): 1×1 and 3×3 convs, a wide Dense
COTANGENTS = (1, 9)
POSITIONS = (1, 2, 4, 8, 9, 16)
EXAMPLES = 32
ROUNDS = 7


def per_example(rows, delta, weight):
    total = None
    for i in range(delta.shape[0]):
        g = tf.matmul(rows, delta[i], transpose_a=True)                  # (N, I, F)
        term = weighted_rows(weight[i], tf.square(g))
        total = term if total is None else total + term
    return total


def main():
    print("| I × F | K | L | per-example ms | pairs ms | per-example / pairs |")
    print("|---|---:|---:|---:|---:|---:|")
    fns = {"per_example": tf.function(per_example), "pairs": tf.function(position_pair_square_sum)}
    rng = np.random.default_rng(0)
    for inputs, outputs in SHAPES:
        for k in COTANGENTS:
            for positions in POSITIONS:
                args = (tf.constant(rng.normal(size=(EXAMPLES, positions, inputs)), tf.float32),
                        tf.constant(rng.normal(size=(k, EXAMPLES, positions, outputs)), tf.float32),
                        tf.constant(rng.uniform(size=(k, EXAMPLES)), tf.float32))
                results = {name: fn(*args).numpy() for name, fn in fns.items()}   # warm-up
                scale = np.abs(results["per_example"]).max()
                np.testing.assert_allclose(results["pairs"], results["per_example"], rtol=1e-4,
                                           atol=1e-5 * scale)
                times = {name: [] for name in fns}
                for _ in range(ROUNDS):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn(*args).numpy()
                        times[name].append(time.perf_counter() - start)
                med = {name: float(np.median(t)) for name, t in times.items()}
                print(f"| {inputs} × {outputs} | {k} | {positions} | {med['per_example'] * 1e3:.1f} "
                      f"| {med['pairs'] * 1e3:.1f} | {med['per_example'] / med['pairs']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
