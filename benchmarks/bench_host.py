"""Host time of a Fisher call: what a repeated call costs beyond its compiled work.

The reference MLP (784-256-256-10) on 8 examples, where the compiled work is small and
any fixed per-call cost shows.  :func:`test_repeated_call_paired` times, in one rotating
loop (machine drift hits every member alike), ROUNDS rounds of:

* ``compiled``: the plan's concrete function called through its flat interface on tensors
  already made, then the one host read of its checks (the least a call can cost);
* ``estimator``: ``FisherEstimator(...)((x, y))`` on the NumPy arrays, a second call on the
  same shapes (what a user pays);
* ``estimator_tensors``: the same call on ``x``, ``y`` already converted to tensors (the
  difference to ``estimator`` is converting the user's arrays, which the floor pays too);
* ``fisher_diagonal``: the functional wrapper (its estimator cached on the model);
* ``floor``: one compiled forward+backward on the same tensors (``bench_fisher``'s floor).

Host time = median(estimator) − median(compiled).  :func:`test_first_call` times the
first call of a fresh estimator (planning, tracing, compiling) next to the floor's first
call (tracing, compiling), on fresh models.

    .venv/bin/python -m pytest benchmarks/bench_host.py --benchmark-only -q \\
        --benchmark-json=benchmarks/results/host.json -o python_files=bench_*.py
    .venv/bin/python -m benchmarks.bench_host benchmarks/results/host.json
"""
import json
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import fastewc
from benchmarks import problems
from benchmarks.conftest import rotate
from fastewc import _keras_compat as compat
from fastewc import data as data_lib

ROUNDS = 200
FIRST_CALLS = 3
KINDS = ["empirical", "exact"]


def _floor(model):
    @tf.function(jit_compile=fastewc.FisherEstimator(model, loss=problems.LOSS).jit_compile)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            value = problems.LOSS(y, model(x, training=False))
        return tape.gradient(value, model.trainable_variables)
    return forward_backward


def _members(kind):
    model, x, y = problems.make("mlp", small=True)
    xt, yt = tf.constant(x), tf.constant(y)
    estimator = fastewc.FisherEstimator(model, loss=problems.LOSS, kind=kind)
    estimator((x, y), seed=0)
    plan = estimator.plan((x, y))
    source = data_lib.Source((x, y))
    labels = lambda t: estimator.likelihood.check_labels(t, plan.out_tail[-1], out_tail=list(plan.out_tail))  # noqa: E731
    batch = next(source.batches(plan.rows, plan.cast, labels))
    args = (batch.x, batch.y, batch.mask, estimator._noise(0, batch, plan),
            tf.constant(batch.count, tf.int32), estimator._initial_state(plan.engine))
    concrete = next(iter(plan.engine._concrete.values()))
    floor = _floor(model)
    return {
        "compiled": lambda: tf.nest.flatten(compat.call_concrete(concrete, args))[-1].numpy(),
        "estimator": lambda: estimator((x, y), seed=0),
        "estimator_tensors": lambda: estimator((xt, yt), seed=0),
        "fisher_diagonal": lambda: fastewc.fisher_diagonal(model, (x, y), loss=problems.LOSS, kind=kind, seed=0),
        "floor": lambda: floor(xt, yt)[-1].numpy(),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_call_paired(benchmark, smoke, device, kind):
    members = _members(kind)
    benchmark.group = f"mlp-host[{device}]"
    times = rotate(benchmark, members, ROUNDS, warmups=5)
    if times is None:
        return
    benchmark.extra_info.update(kind=kind, role="host", medians={n: float(np.median(t)) for n, t in times.items()},
                                mins={n: float(np.min(t)) for n, t in times.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_first_call(benchmark, smoke, device, kind):
    """First calls on fresh models: the estimator's (plan + trace + compile + run) and the
    floor's (trace + compile + run)."""
    firsts = {"estimator": [], "floor": []}

    def fresh():
        model, x, y = problems.make("mlp", small=True)
        xt, yt = tf.constant(x), tf.constant(y)
        start = time.perf_counter()
        _floor(model)(xt, yt)[-1].numpy()
        firsts["floor"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fastewc.FisherEstimator(model, loss=problems.LOSS, kind=kind)((x, y), seed=0)
        firsts["estimator"].append(time.perf_counter() - start)

    benchmark.group = f"mlp-first-call[{device}]"
    if benchmark.disabled:
        benchmark(fresh)
        return
    benchmark.pedantic(fresh, rounds=FIRST_CALLS, iterations=1)
    benchmark.extra_info.update(kind=kind, role="first", medians={n: float(np.median(t)) for n, t in firsts.items()})


def summary(doc):
    lines = []
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        med = info.get("medians", {})
        if info.get("role") == "host":
            ms = {n: v * 1e3 for n, v in med.items()}
            lines.append(
                f"{info['kind']}: compiled {ms['compiled']:.3f} ms, estimator {ms['estimator']:.3f} ms "
                f"(host {ms['estimator'] - ms['compiled']:.3f} ms; on tensors "
                f"{ms['estimator_tensors'] - ms['compiled']:.3f} ms), fisher_diagonal "
                f"{ms['fisher_diagonal']:.3f} ms, floor {ms['floor']:.3f} ms")
        elif info.get("role") == "first":
            lines.append(f"{info['kind']} first call: estimator {med['estimator']:.2f} s, floor "
                         f"{med['floor']:.2f} s ({med['estimator'] / med['floor']:.1f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
