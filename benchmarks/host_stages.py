"""Where a repeated Fisher call spends its host time, stage by stage (issue 25 item 4).

The reference MLP (512 examples) under ``curvature="kfac"``, as ``peers_kfac`` calls it:
:meth:`fastewc.FisherEstimator.__call__`'s steps replayed one by one on a warm estimator
(the same calls, in the same order, for a one-batch call), each timed with
``time.perf_counter``; the median of each over ``--calls`` calls.  ``run`` is the one
compiled call (its dispatch and its work); every other row is host time.

    .venv/bin/python -m benchmarks.host_stages [--kind sampled] [--tensors] [--calls 300]
"""
import argparse
import time

import numpy as np
import tensorflow as tf

import fastewc
from benchmarks import problems
from fastewc import data as data_lib
from fastewc import likelihood as likelihood_lib
from fastewc._checks import check_seed
from fastewc.engines.base import Checks, is_distributed


def stages(estimator, x, y, calls):
    times = {}

    def lap(name, start):
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(calls):
        t = first = time.perf_counter()
        seed = check_seed(0)
        _, variables = estimator._checked_model()
        t = lap("argument and model checks", t)
        source = data_lib.Source((x, y), None)
        t = lap("data checks (Source)", t)
        distributed = is_distributed()
        plan = estimator._plan_for(source, distributed, variables)
        t = lap("strategy and plan lookup", t)
        lik, out_tail = plan.likelihood, plan.out_tail
        batches = source.batches(plan.rows, plan.cast,
                                 lambda y: lik.check_labels(y, out_tail[-1], out_tail=list(out_tail)),
                                 lambda w: likelihood_lib.check_sample_weight(lik, w, out_tail))
        batch = next(batches)
        assert next(batches, None) is None, "one batch expected"
        t = lap("batch: conversion, label checks", t)
        noise = estimator._noise(seed, batch, plan, distributed)
        t = lap("noise", t)
        state = plan.engine.run(batch, noise, estimator._initial_state(plan.engine), alone=True)
        t = lap("run (the compiled call)", t)
        checks = Checks.read(plan.engine.finish(state).checks)
        t = lap("read-back of the checks", t)
        assert not checks.bad_ids.any() and checks.finite
        lik.check_output_range(float(checks.output_range[0]), float(checks.output_range[1]))
        t = lap("output range", t)
        plan.blocks.assemble(state.means)
        t = lap("result object", t)
        times.setdefault("total", []).append(t - first)
    return {name: float(np.median(v)) for name, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="empirical", choices=("empirical", "sampled", "exact"))
    parser.add_argument("--tensors", action="store_true", help="x, y as tensors (else NumPy)")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    model, x, y = problems.make("mlp")
    if args.tensors:
        x, y = tf.constant(x), tf.constant(y)
    estimator = fastewc.FisherEstimator(model, loss=problems.LOSS, kind=args.kind, curvature="kfac")
    for _ in range(5):
        estimator((x, y), seed=0)
    medians = stages(estimator, x, y, args.calls)
    host = medians["total"] - medians["run (the compiled call)"]
    for name, value in medians.items():
        print(f"{name:34s} {value * 1e3:8.3f} ms")
    print(f"{'host (total - run)':34s} {host * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
