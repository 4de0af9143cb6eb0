"""main's fastewc (imported beside this tree's by :func:`benchmarks.ab_inprocess.import_old`)
against this tree's, a KFAC call on the reference MLP with more examples than the reference
512: one batch of ``n`` rows, so its first A is formed from n × 785 rows (by
:func:`fastewc.contract.gram`'s blocks from n = 1024).  The two estimators alternate round
by round in one process; prints the medians, the median per-round ratio new ÷ old with its
quartiles, each first call and the first A's largest difference.

    .venv/bin/python -m benchmarks.gram_ab 4096 31 empirical sampled exact   # n, rounds, kinds
"""
import statistics
import sys
import tempfile
import time

import numpy as np

import fastewc
from benchmarks import problems
from benchmarks.ab_inprocess import import_old


def main(argv):
    n, rounds, kinds = int(argv[0]), int(argv[1]), argv[2:]
    old = import_old("main", tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    x = rng.random((n, 784)).astype(np.float32)
    y = rng.integers(0, problems.CLASSES, n).astype(np.int32)
    for kind in kinds:
        model, _, _ = problems.make("mlp")
        members = {"old": old.FisherEstimator(model, loss=problems.LOSS, kind=kind, curvature="kfac"),
                   "new": fastewc.FisherEstimator(model, loss=problems.LOSS, kind=kind, curvature="kfac")}
        first, a = {}, {}
        for label, estimator in members.items():
            start = time.perf_counter()
            estimator((x, y), seed=0)
            first[label] = time.perf_counter() - start
            a[label] = estimator((x, y), seed=0).blocks[0].a.numpy()
        times, ratios = {label: [] for label in members}, []
        for r in range(rounds):
            for label in (["old", "new"] if r % 2 else ["new", "old"]):
                start = time.perf_counter()
                members[label]((x, y), seed=0)
                times[label].append(time.perf_counter() - start)
            ratios.append(times["new"][-1] / times["old"][-1])
        q = statistics.quantiles(ratios, n=4)
        print(f"mlp {n} rows {kind}: old {statistics.median(times['old']) * 1e3:.1f} ms, "
              f"new {statistics.median(times['new']) * 1e3:.1f} ms; new ÷ old per round "
              f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}–{q[2]:.3f}); first call old "
              f"{first['old']:.2f} s, new {first['new']:.2f} s; first A's max |new − old| ÷ max "
              f"{np.abs(a['new'] - a['old']).max() / np.abs(a['old']).max():.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
