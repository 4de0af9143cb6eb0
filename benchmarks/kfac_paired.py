"""fastewc's KFAC factors against the hand-written kernel alone, interleaved in one process:
a quick form of ``bench_kfac.py::test_factors``'s "KFAC ÷ hand-written" column (no floor,
no diagonal, fewer rounds) for a loaded machine, where the suite's CNN rotation is long.

    .venv/bin/python -m benchmarks.kfac_paired cnn empirical 5     # problem, kind, rounds

Prints each member's first call (trace + compile + run), the rows per call, and the
medians and their ratio.  The kernel runs without XLA (the faster of the two on CPU).
"""
import statistics
import sys
import time

import tensorflow as tf

import fastewc
from benchmarks import handwritten_kfac, problems


def main(argv):
    name, kind, rounds = argv[0], argv[1], int(argv[2])
    model, x, y = problems.make(name)
    estimator = fastewc.FisherEstimator(model, loss=problems.LOSS, kind=kind, curvature="kfac")
    kernel = handwritten_kfac.kfac_function(model, kind)
    xt, yt, seed = tf.constant(x), tf.constant(y), tf.constant([0, 0])
    members = {"kfac": lambda: estimator((x, y), seed=0),
               "kernel": lambda: kernel(xt, yt, seed)[-1][-1].numpy()}
    first = {}
    for label, fn in members.items():
        start = time.perf_counter()
        fn()
        first[label] = round(time.perf_counter() - start, 2)
        fn()
    print("first call s", first, "rows", estimator.plan((x, y)).rows)
    times = {label: [] for label in members}
    for r in range(rounds):
        for label in (list(members) if r % 2 else list(members)[::-1]):
            start = time.perf_counter()
            members[label]()
            times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    print(name, kind, {k: f"{v * 1e3:.1f} ms" for k, v in medians.items()},
          f"KFAC ÷ hand-written {medians['kfac'] / medians['kernel']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
