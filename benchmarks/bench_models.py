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

* :func:`test_fidelity`: the default estimator (``method="auto"``) against the float64
  per-example oracle (:func:`fastewc.testing.reference_fisher` on
  :func:`fastewc.testing.float64_twin`) on ``FIDELITY_EXAMPLES`` examples, kinds empirical
  and exact: worst relative error per variable ≤ ``FIDELITY_BOUND`` (1e-4), a variable whose
  Fisher is below 1e-7 of the largest entry (an attention key bias is analytically zero:
  softmax ignores a constant shift of the keys) within 1e-7 of the largest entry
  (:func:`fidelity`).  Where float32 itself cannot reach 1e-4 (the float32 loop,
  ``method="loop"``, misses it as well: ResNet50 and EfficientNetB0 at random init, whose
  deep stacks amplify float32 rounding), two float32 evaluations differ from each other by
  about as much as each differs from float64, so "1e-4 from the float32 loop" cannot hold
  either; fastewc must then be no farther from float64 than ``FLOAT32_SLACK`` × the float32
  loop is, and ``extra_info["fidelity"][kind]`` says so (``reference: "float32 limit"``,
  the ``bound``, the ``reason``, and fastewc's distance to the loop).  Where the exact oracle (one float64 tape per example, ``classes``
  gradients) would take more than ``ORACLE_BUDGET_S``, sampled replaces exact
  (``extra_info["replaced"]``).  The test asserts the bound; its product is
  ``extra_info["fidelity"]``, not a timing.

The report: ``python -m benchmarks.report_models <json>`` (ratios member median / best
floor median; the loop as seconds per example × N / floor).

    .venv/bin/python -m pytest benchmarks/bench_models.py --benchmark-only -q \\
        -o python_files=bench_*.py --benchmark-json=models.json [-k "lstm or bert"]
    .venv/bin/python -m benchmarks.report_models models.json

Smoke mode (``--benchmark-disable``, the second half of ``make test``) must stay cheap:
each SMOKED model runs on ``models.SMOKE_EXAMPLES`` examples of ``models.SMOKE_LENGTH``
tokens, the two members cheapest to compile, ``floor_noxla`` and ``empirical`` (``floor_xla`` and
``exact`` run the same benchmark code with another ``jit_compile`` / ``kind``), once each
(their first calls: no timing rounds, no memory probe), the loop on 1 example, and the
fidelity check on the models and kinds of ``FIDELITY_SMOKE`` (a few of the SMOKED models,
one kind each but conv1d: compiling both kinds on every SMOKED model takes ~60 s).  The
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
from benchmarks import models, problems
from fastewc import testing
from benchmarks.conftest import rotate
from benchmarks.memory import peak_bytes

KINDS = ("empirical", "exact")
FLOORS = {"floor_xla": True, "floor_noxla": False}
SMOKE_MEMBERS = ("floor_noxla", "empirical")   # the cheapest to compile (docstring)
LOOP_EXAMPLES = 4
ROUND_BUDGET_S = 20.0          # rotation rounds: about this long in total, within ROUNDS
ROUNDS = (3, 15)
FIDELITY_EXAMPLES = 4          # test_fidelity: examples (smoke: models.SMOKE_EXAMPLES)
FIDELITY_BOUND = 1e-4          # relative, per variable (fidelity())
FLOAT32_SLACK = 2.0            # where float32 misses the bound: x the float32 loop's distance
ZERO_FLOOR = 1e-7              # variables whose Fisher is (analytically) ~0: × the largest entry
ORACLE_BUDGET_S = 60.0         # the exact float64 oracle's estimated time, beyond: sampled instead
FIDELITY_SAMPLES = 2           # draws per example when sampled replaces exact
FIDELITY_SEED = 3
# Smoke mode: the fidelity kinds per model (others skipped): compiling both kinds' Fisher
# functions on all SMOKED models takes ~60 s, beyond the smoke budget of ``make test``.
# conv1d runs both kinds; bert (dict inputs, GetItem operations in the twin) empirical;
# lstm exact.  The Applications' fidelity (BatchNorm, depthwise rules) is in
# tests/test_rules.py on small models and in the full run here.
FIDELITY_SMOKE = {"conv1d": ("empirical", "exact"), "bert": ("empirical",), "lstm": ("exact",)}
_CACHE = {}


def kinds_of(name):
    """The Fisher kinds benchmarked on ``name``: KINDS, or its spec's (the causal LM:
    empirical and sampled, exact being K = vocabulary × positions backward passes)."""
    return models.SPECS[name].kinds or KINDS


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


def _error(err):
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"


@pytest.mark.parametrize("name", list(models.SPECS))
def test_model(benchmark, smoke, device, name):
    model, x, y = problem(name, smoke, device)
    benchmark.group = f"models-{name}[{device}]"
    info = benchmark.extra_info
    info.update(role="models", model=name, examples=len(y), params=models.num_params(model))

    chosen = lambda member: not smoke or member in SMOKE_MEMBERS   # noqa: E731
    floors = {member: problems.floor_function(model, jit) for member, jit in FLOORS.items() if chosen(member)}
    estimators = {kind: fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind)
                  for kind in kinds_of(name) if chosen(kind)}
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
        probe = ([best] if best else []) + [k for k in kinds_of(name) if k in working]
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


# -- fidelity against the float64 per-example oracle --------------------------------------
def fidelity(fisher, ref, names, *, floor=ZERO_FLOOR):
    """How far ``fisher`` is from ``ref`` (lists aligned with ``names``).

    A variable v with ``max|ref_v| >= floor × top`` (top: the largest entry of the whole
    ``ref``) scores ``max|fisher_v - ref_v| / max|ref_v|`` (bound FIDELITY_BOUND); a
    variable below (analytically zero, e.g. an attention key bias: softmax ignores a
    constant shift of the keys) scores ``max|fisher_v - ref_v| / top`` (bound ``floor``).
    Returns {"error": worst relative error of the first kind, "worst": its variables,
    worst first (at most 3, with their errors), "zero_error": worst of the second kind
    (0.0 if there is none), "zero_worst": its variable, "zero_variables": how many,
    "zero_names": (up to 10 of) them, "zero_relative": their worst error relative to their
    own largest entry (informational: a tiny but not analytically zero Fisher, e.g. the
    query/key kernels of a random-init attention, lands here), "top"}."""
    ref = [np.asarray(r, np.float64) for r in ref]
    top = max(float(np.abs(r).max()) if r.size else 0.0 for r in ref)
    regular, zero = [], []
    for name, got, want in zip(names, fisher, ref):
        got = np.asarray(got, np.float64)
        if got.shape != want.shape:
            raise ValueError(f"fidelity: {name} has shape {got.shape}, the reference {want.shape}")
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        if not np.all(np.isfinite(got)):
            diff = float("inf")
        scale = float(np.abs(want).max()) if want.size else 0.0
        if scale >= floor * top and scale > 0:
            regular.append((diff / scale, name))
        else:
            zero.append((diff / top if top > 0 else diff, name, diff / scale if scale > 0 else 0.0))
    regular.sort(reverse=True)
    zero.sort(reverse=True)
    return {"error": regular[0][0] if regular else 0.0,
            "worst": [[name, err] for err, name in regular[:3]],
            "zero_error": zero[0][0] if zero else 0.0,
            "zero_worst": zero[0][1] if zero else None,
            "zero_variables": len(zero),
            "zero_names": [z[1] for z in zero[:10]],
            "zero_relative": max((z[2] for z in zero), default=0.0),   # informational, not bounded
            "top": top}


def _within(score):
    return score["error"] <= FIDELITY_BOUND and score["zero_error"] <= ZERO_FLOOR


def _fidelity_kind(model, twin, x, y, kind, names, *, compare_loop):
    """One kind: fastewc's default estimator, the float64 oracle on the twin, and (when
    ``compare_loop`` or when fastewc misses the bound) the float32 loop.  Returns the
    record of ``extra_info["fidelity"][kind]`` and a failure message or None."""
    sampled = kind == "sampled"
    options = dict(num_samples=FIDELITY_SAMPLES) if sampled else {}
    call = dict(seed=FIDELITY_SEED) if sampled else {}
    start = time.perf_counter()
    labels = None
    if sampled:
        labels = testing.reference_sampled_labels(twin, x, loss=models.LOSS, num_samples=FIDELITY_SAMPLES,
                                                  seed=FIDELITY_SEED, batch_size=None)
    ref = testing.reference_fisher(twin, x, y, loss=models.LOSS, kind=kind, sampled_labels=labels)
    oracle_s = time.perf_counter() - start
    estimator = fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind, **options)
    plan = estimator.plan((x, y))
    start = time.perf_counter()
    fisher = [t.numpy() for t in estimator((x, y), **call)]
    fastewc_s = time.perf_counter() - start
    versus64 = fidelity(fisher, ref, names)
    record = {"method": plan.method, "oracle_s": oracle_s, "fastewc_s": fastewc_s, "reference": "float64",
              "vs_float64": versus64, "error": versus64["error"], "zero_error": versus64["zero_error"],
              "worst": versus64["worst"]}
    if compare_loop or not _within(versus64):
        start = time.perf_counter()
        try:
            loop = fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind, method="loop", **options)
            loop_fisher = [t.numpy() for t in loop((x, y), **call)]
        except Exception as err:   # noqa: BLE001 -- recorded; fatal only where the loop is the reference
            record["loop_error"] = _error(err)
            if _within(versus64):
                return record, None
            return record, f"{kind}: {versus64['error']:.2e} relative vs float64 and the float32 loop failed: {_error(err)}"
        record["loop_s"] = time.perf_counter() - start
        record["loop_vs_float64"] = fidelity(loop_fisher, ref, names)
        if not _within(versus64) and not _within(record["loop_vs_float64"]):
            # float32 itself cannot reach the bound here.  Two float32 evaluations (the loop
            # and fastewc) then differ by about float32's own error too, so the bound is:
            # fastewc no farther from float64 than FLOAT32_SLACK x the float32 loop is.
            loop_error = record["loop_vs_float64"]["error"]
            record.update(vs_float32_loop=fidelity(fisher, loop_fisher, names), reference="float32 limit",
                          bound=FLOAT32_SLACK * loop_error,
                          reason=(f"float32 itself is {loop_error:.1e} (relative) from float64 here: the "
                                  f"float32 loop (method='loop') misses the {FIDELITY_BOUND:.0e} bound too; "
                                  f"fastewc's {versus64['error']:.1e} is judged against "
                                  f"{FLOAT32_SLACK:g} x the loop's"))
    failure = None
    bound = record.get("bound", FIDELITY_BOUND)
    if not (record["error"] <= bound and record["zero_error"] <= ZERO_FLOOR):
        failure = (f"{kind}: {record['error']:.2e} relative vs {record['reference']} (bound {bound:.1e}; "
                   f"worst {record['worst'][:1]}), near-zero variables {record['zero_error']:.2e} of the largest "
                   f"entry (bound {ZERO_FLOOR:.0e})")
    return record, failure


@pytest.mark.parametrize("name", list(models.SPECS))
def test_fidelity(benchmark, smoke, device, name):
    """fastewc's default estimator (method auto) against the float64 per-example oracle
    (:func:`fastewc.testing.reference_fisher` on :func:`fastewc.testing.float64_twin`) on
    the first FIDELITY_EXAMPLES examples, kinds empirical and exact (smoke:
    models.SMOKE_EXAMPLES examples, the models and kinds of FIDELITY_SMOKE); bound:
    :func:`fidelity`.  Where float32 itself misses the bound (the float32
    loop, ``method="loop"``, is as far from float64: ResNet50 and EfficientNetB0 at random
    init), fastewc must be no farther from float64 than FLOAT32_SLACK × the loop is
    (``reference: "float32 limit"``, the ``bound`` and the ``reason`` in
    ``extra_info["fidelity"][kind]``).  The exact oracle takes one tape per
    example and ``classes`` gradients from it; where its estimated time (the empirical
    oracle's × classes) exceeds ORACLE_BUDGET_S, ``sampled`` (FIDELITY_SAMPLES draws) replaces
    exact (``extra_info["replaced"]`` says so).  Outside smoke mode the float32 loop runs
    for every kind (its own distance from float64 is recorded as ``loop_vs_float64``)."""
    if smoke and name not in FIDELITY_SMOKE:
        pytest.skip(f"{name}: not in the fidelity smoke pass (FIDELITY_SMOKE says why)")
    model, x, y = problem(name, smoke, device)
    kinds = FIDELITY_SMOKE[name] if smoke else kinds_of(name)
    n = min(len(y), models.SMOKE_EXAMPLES if smoke else FIDELITY_EXAMPLES)
    xs, ys = tf.nest.map_structure(lambda a: a[:n], x), y[:n]
    benchmark.group = f"models-{name}[{device}]"
    info = benchmark.extra_info
    info.update(role="models-fidelity", model=name, examples=n, bound=FIDELITY_BOUND, zero_floor=ZERO_FLOOR)
    names = [v.path for v in model.trainable_variables]
    records, failures = {}, []

    def run_all():
        start = time.perf_counter()
        twin = testing.float64_twin(model)
        info["twin_s"] = time.perf_counter() - start
        for kind in kinds:
            if kind == "exact" and "empirical" in records:
                estimate = records["empirical"]["oracle_s"] * models.CLASSES
                if estimate > ORACLE_BUDGET_S:
                    info["replaced"] = {"exact": "sampled", "reason": (
                        f"the exact float64 oracle would take ~{estimate:.0f} s (> {ORACLE_BUDGET_S:.0f} s)")}
                    kind = "sampled"
            records[kind], failure = _fidelity_kind(model, twin, xs, ys, kind, names, compare_loop=not smoke)
            if failure:
                failures.append(failure)
        info["fidelity"] = records

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    info.setdefault("fidelity", records)
    assert not failures, f"{name}: " + "; ".join(failures)


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
