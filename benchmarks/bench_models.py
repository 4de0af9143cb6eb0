"""Fisher estimation on real models: Keras Applications, text classifiers, keras_hub.

The models are :mod:`benchmarks.models` (10 classes, random weights, BatchNorm statistics
of the Applications calibrated on one batch: see there).  Every estimator is
``fastewc.FisherEstimator(model, loss=LOSS, kind=...)`` with its defaults
(``method="auto"``, default ``batch_size`` and ``jit_compile``): what a user gets.

Per model:

* :func:`test_model` times, SIDE BY SIDE in one :func:`benchmarks.conftest.rotate` (so
  machine drift hits all alike), four members on the same N examples:
  ``floor_xla`` and ``floor_noxla`` (one compiled forward+backward of the mean loss, with
  and without XLA; the faster is "the floor"), ``empirical`` and ``exact`` (one estimator
  call each, on the same NumPy arrays the floors get).  Before the rotation each member's
  first call (trace + compile + one run, on a fresh function / estimator; the floors
  first, then empirical, then exact, on a model nothing has called yet) is timed.
  ``extra_info``: ``medians`` / ``mins`` per member (seconds), ``first_call_s`` per
  member, ``plans`` per kind (the method ``auto`` picked, K = ``plan.num_cotangents``,
  rows per compiled call, the engine's jit_compile), ``first_call_peak_bytes`` per member
  and ``peak_bytes`` of one steady call of the best floor and of each kind (process RSS
  above its value before the call on CPU, :mod:`benchmarks.memory`; a steady call mostly
  reuses memory the allocator already holds), ``examples``, ``params``,
  and ``errors``: a member that raises is dropped from the rotation, its error recorded,
  and the test FAILS with that error after the others were timed (the JSON keeps the
  others; the report marks the failed cells).
* :func:`test_loop`: ``method="loop"`` (kind empirical, the eager per-example loop) on
  ``LOOP_EXAMPLES`` examples, one timed round; ``extra_info["per_example_s"]``.

The report: ``python -m benchmarks.report_models <json>`` (ratios member median / best
floor median; the loop as seconds per example × N / floor).

    .venv/bin/python -m pytest benchmarks/bench_models.py --benchmark-only -q \\
        -o python_files=bench_*.py --benchmark-json=models.json [-k "lstm or bert"]
    .venv/bin/python -m benchmarks.report_models models.json

Smoke mode (``--benchmark-disable``, the second half of ``make test``) must stay cheap:
each SMOKED model runs on ``models.SMOKE_EXAMPLES`` examples of ``models.SMOKE_LENGTH``
tokens, the two members cheapest to compile, ``floor_noxla`` and ``empirical`` (``floor_xla`` and
``exact`` run the same benchmark code with another ``jit_compile`` / ``kind``), once each
(their first calls: no timing rounds, no memory probe), and the loop on 1 example.  The
big Applications (MobileNetV2, EfficientNetB0,
ResNet50, DenseNet121, ConvNeXtTiny) are skipped there: tracing and compiling their
Fisher functions takes tens of seconds each, beyond the smoke budget of ``make test``;
MobileNetV3Small (``alpha=0.75, minimalistic=True`` in smoke mode) stands for them.
keras_hub models are skipped when ``keras_hub`` is not importable.
"""
import time

import numpy as np
import pytest
import tensorflow as tf

import fastewc
from benchmarks import models
from benchmarks.conftest import rotate
from benchmarks.memory import peak_bytes

KINDS = ("empirical", "exact")
FLOORS = {"floor_xla": True, "floor_noxla": False}
SMOKE_MEMBERS = ("floor_noxla", "empirical")   # the cheapest to compile (docstring)
LOOP_EXAMPLES = 4
ROUND_BUDGET_S = 20.0          # rotation rounds: about this long in total, within ROUNDS
ROUNDS = (3, 15)
_CACHE = {}


def problem(name, smoke, device):
    """(model, x, y), built once per device and mode; skips what the mode does not run."""
    if smoke and name not in models.SMOKED:
        pytest.skip(f"{name}: not in the smoke pass (bench_models.py docstring says why)")
    if models.SPECS[name].family == "hub":
        pytest.importorskip("keras_hub")
    key = (name, smoke, device)
    if key not in _CACHE:
        _CACHE[key] = models.make(name, small=smoke)
    return _CACHE[key]


def floor_function(model, jit):
    """A fresh compiled forward+backward of the mean loss (its last gradient read back)."""
    @tf.function(jit_compile=jit)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            value = models.LOSS(y, model(x, training=False))
        return tape.gradient(value, model.trainable_variables)
    return lambda x, y: forward_backward(x, y)[-1].numpy()


def _error(err):
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"


@pytest.mark.parametrize("name", list(models.SPECS))
def test_model(benchmark, smoke, device, name):
    model, x, y = problem(name, smoke, device)
    benchmark.group = f"models-{name}[{device}]"
    info = benchmark.extra_info
    info.update(role="models", model=name, examples=len(y), params=models.num_params(model))

    chosen = lambda member: not smoke or member in SMOKE_MEMBERS   # noqa: E731
    floors = {member: floor_function(model, jit) for member, jit in FLOORS.items() if chosen(member)}
    estimators = {kind: fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind)
                  for kind in KINDS if chosen(kind)}
    members = {member: (lambda f=f: f(x, y)) for member, f in floors.items()}
    members.update({kind: (lambda e=e: e((x, y))[-1].numpy()) for kind, e in estimators.items()})

    first, first_peaks, errors, failures = {}, {}, {}, []

    def first_calls():
        for member, fn in members.items():
            start = time.perf_counter()
            try:
                _, first_peaks[member], _ = peak_bytes(fn, device)
            except Exception as err:   # noqa: BLE001 -- recorded, re-raised at the end
                errors[member] = _error(err)
                failures.append((member, err))
                continue
            first[member] = time.perf_counter() - start

    if smoke:
        benchmark(first_calls)
    else:
        first_calls()
    info.update(first_call_s=first, first_call_peak_bytes={m: int(p) for m, p in first_peaks.items()},
                errors=errors)
    plans = {}
    for kind, estimator in estimators.items():
        if kind in errors:
            continue
        plan = estimator.plan((x, y))
        plans[kind] = {"method": plan.method, "K": plan.num_cotangents, "rows": plan.rows,
                       "jit_compile": bool(plan.engine.jit_compile)}
    info.update(plans=plans)

    working = {m: fn for m, fn in members.items() if m not in errors}
    if not smoke and working:
        start = time.perf_counter()
        for fn in working.values():      # the warm-up round, and an estimate of one round
            fn()
        spent = time.perf_counter() - start
        rounds = int(np.clip(np.ceil(ROUND_BUDGET_S / max(spent, 1e-6)), *ROUNDS))
        times = rotate(benchmark, working, rounds, warmups=0)
        info.update(rounds=rounds, medians={m: float(np.median(t)) for m, t in times.items()},
                    mins={m: float(np.min(t)) for m, t in times.items()})
        best = min((m for m in working if m in FLOORS), key=lambda m: info["medians"][m], default=None)
        probe = ([best] if best else []) + [k for k in KINDS if k in working]
        peaks = {}
        for member in probe:
            _, peaks[member], how = peak_bytes(working[member], device)
        info.update(peak_bytes={m: int(p) for m, p in peaks.items()}, peak_measure=how if probe else "")
    elif not smoke:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)   # keep the errors in the JSON
    if failures:
        member, err = failures[0]
        others = "; ".join(f"{m}: {e}" for m, e in errors.items() if m != member)
        err.add_note(f"bench_models: member {member!r} of {name} failed"
                     + (f" (also failed: {others})" if others else "") + "; the others were timed.")
        raise err


@pytest.mark.parametrize("name", list(models.SPECS))
def test_loop(benchmark, smoke, device, name):
    model, x, y = problem(name, smoke, device)
    n = 1 if smoke else min(LOOP_EXAMPLES, len(y))
    xs, ys = tf.nest.map_structure(lambda a: a[:n], x), y[:n]
    benchmark.group = f"models-{name}[{device}]"
    benchmark.extra_info.update(role="models-loop", model=name, examples=n, kind="empirical")
    estimator = fastewc.FisherEstimator(model, loss=models.LOSS, kind="empirical", method="loop")
    estimate = lambda: estimator((xs, ys))[-1].numpy()   # noqa: E731
    if smoke:
        benchmark(estimate)
    else:
        estimate()                       # warm-up (the fold's trace)
        benchmark.pedantic(estimate, rounds=1, iterations=1)
        benchmark.extra_info["per_example_s"] = benchmark.stats.stats.median / n
    _CACHE.pop((name, smoke, device), None)   # the model's last user in this module
