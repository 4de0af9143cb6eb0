"""Kronecker-factored EWC (issue 17): the factors against the floor, the penalty against the
diagonal's, and the train step with each.

* ``test_factors[problem-kind]``: on the reference MLP (512 examples) and CNN (256), one
  rotation of ``floor`` (compiled forward+backward of the mean loss, no XLA and XLA: the
  faster is the floor), ``diagonal`` (:func:`fastewc.fisher_diagonal`) and ``kfac``
  (:func:`fastewc.kfac_fisher`), default arguments, and the plain hand-written TensorFlow
  KFAC kernel (:mod:`benchmarks.handwritten_kfac`, no XLA and XLA: the faster is the
  kernel); plus each one's first call (trace and compile) in a fresh estimator, before the
  rotation.  The kernel's factors must agree with fastewc's (empirical and exact; the
  sampled labels are drawn differently).
* ``test_penalty[T]``: the reference MLP's penalty and gradient
  (``ewc.penalty_and_gradients()`` in a tf.function) for an EWC holding T = 1, 5, 20 tasks:
  diagonal (separate), KFAC separate (T terms per layer), KFAC online with
  ``kfac_sum="nearest"`` (one term per layer); ``T`` rotated within one test.
* ``test_train_step[batch]``: ``fastewc.make_train_step`` (defaults) on the reference MLP at
  batch 32 and 256: no EWC, diagonal EWC, KFAC separate with 5 tasks, KFAC online-nearest;
  10 optimizer steps per timed call (``steps_per_call=10``).

Every member is warmed up, then timed in rounds whose order reverses each round (the
machine drifts); each member's median is in ``extra_info["medians"]``.  The smoke pass
(``--benchmark-disable``, in ``make test``) runs the MLP's exact kind, T = 1 and 5 and
batch 32.

    .venv/bin/python -m pytest benchmarks/bench_kfac.py --benchmark-only -q \\
        -o python_files=bench_*.py --benchmark-json=benchmarks/results/kfac.json
    .venv/bin/python -m benchmarks.bench_kfac benchmarks/results/kfac.json     # the tables
"""
import json
import statistics
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from benchmarks import handwritten_kfac, problems
from benchmarks.conftest import rotate

KINDS = ("empirical", "sampled", "exact")
TASKS = (1, 5, 20)
BATCHES = (32, 256)
LAM = 100.0
STEPS = 10


def _medians(times):
    return None if times is None else {name: statistics.median(t) for name, t in times.items()}


def _first_call(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_factors(benchmark, smoke, device, name, kind):
    if smoke and (kind != "exact" or name != "mlp"):
        pytest.skip("smoke subset: the MLP, exact")
    model, x, y = problems.make(name, small=smoke)
    benchmark.group = f"kfac-factors[{device}]"
    fisher_args = dict(loss=problems.LOSS, kind=kind)
    members = {
        "floor_noxla": lambda f=problems.floor_function(model, False): f(x, y),
        "floor_xla": lambda f=problems.floor_function(model, True): f(x, y),
        "diagonal": lambda: fastewc.FisherEstimator(model, **fisher_args),
        "kfac": lambda: fastewc.FisherEstimator(model, curvature="kfac", **fisher_args),
    }
    for jit in (False, True):
        kernel = handwritten_kfac.kfac_function(model, kind, jit_compile=jit)
        members[f"handwritten_{'xla' if jit else 'noxla'}"] = (
            lambda k=kernel: k(tf.constant(x), tf.constant(y), tf.constant([0, 0]))[-1][-1].numpy())
    first = {}
    for label in ("floor_noxla", "floor_xla", "handwritten_noxla", "handwritten_xla"):
        first[label] = _first_call(members[label])
    for label in ("diagonal", "kfac"):
        estimator = members[label]()
        first[label] = _first_call(lambda e=estimator: e((x, y), seed=0))
        members[label] = lambda e=estimator: e((x, y), seed=0) and None
    if kind != "sampled":
        _check_against_kernel(model, x, y, kind)
    times = rotate(benchmark, members, rounds=3 if smoke else 15)
    benchmark.extra_info.update(problem=name, kind=kind, first_call=first, medians=_medians(times))


def _check_against_kernel(model, x, y, kind):
    """fastewc's factors against the hand-written kernel's (both float32 sums of the same
    products; relative to each factor's largest entry)."""
    ours = fastewc.kfac_fisher(model, (x, y), loss=problems.LOSS, kind=kind).blocks
    kernel = handwritten_kfac.kfac_function(model, kind)(tf.constant(x), tf.constant(y), tf.constant([0, 0]))
    for block, factors in zip(ours, kernel, strict=True):
        for got, want in zip((block.a, block.g), factors):
            scale = float(tf.reduce_max(tf.abs(want)))
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5 * scale,
                                       err_msg=f"layer {block.layer}")


class PenaltyProblem:
    """The reference MLP with a diagonal EWC and two KFAC EWCs advanced task by task."""

    def __init__(self, smoke):
        self.model, x, y = problems.make("mlp", small=smoke)
        factors = fastewc.kfac_fisher(self.model, (x, y), loss=problems.LOSS, kind="empirical")
        self.fisher = [tf.abs(f) for f in factors.full_diagonal()]
        self.factors = factors
        self.ewcs = {
            "diagonal": fastewc.EWC(self.model, lam=LAM),
            "kfac_separate": fastewc.EWC(self.model, lam=LAM, curvature="kfac"),
            "kfac_online_nearest": fastewc.EWC(self.model, lam=LAM, curvature="kfac", mode="online",
                                               kfac_sum="nearest"),
        }

    def advance_to(self, num_tasks):
        for label, ewc in self.ewcs.items():
            while ewc.num_tasks < num_tasks:
                t = ewc.num_tasks
                anchors = [v + 0.01 * tf.random.stateless_normal(v.shape, seed=[t, i])
                           for i, v in enumerate(self.model.trainable_variables)]
                ewc.add_task(self.fisher if label == "diagonal" else self.factors, anchors)

    def penalty_fn(self, label):
        fn = tf.function(lambda: self.ewcs[label].penalty_and_gradients())
        return lambda: fn()[1][0].numpy()


@pytest.mark.parametrize("num_tasks", TASKS)
def test_penalty(benchmark, smoke, device, num_tasks, _penalty_problems={}):
    if smoke and num_tasks == TASKS[-1]:
        pytest.skip("smoke subset: the fewer tasks")
    key = (smoke, device)
    if key not in _penalty_problems:
        _penalty_problems[key] = PenaltyProblem(smoke)
    problem = _penalty_problems[key]
    problem.advance_to(num_tasks)
    benchmark.group = f"kfac-penalty[{device}]"
    members = {label: problem.penalty_fn(label) for label in problem.ewcs}
    times = rotate(benchmark, members, rounds=3 if smoke else 30)
    benchmark.extra_info.update(tasks=num_tasks, medians=_medians(times),
                                state_bytes={k: e.state_bytes for k, e in problem.ewcs.items()})


@pytest.mark.parametrize("batch", BATCHES)
def test_train_step(benchmark, smoke, device, batch):
    if smoke and batch != BATCHES[0]:
        pytest.skip("smoke subset: one batch size")
    batch = 4 if smoke else batch
    model, x, y = problems.make("mlp", small=True)
    rng = np.random.default_rng(0)
    xs = tf.constant(rng.normal(size=(STEPS, batch, 784)).astype(np.float32))
    ys = tf.constant(rng.integers(0, problems.CLASSES, size=(STEPS, batch)).astype(np.int32))
    factors = fastewc.kfac_fisher(model, (x, y), loss=problems.LOSS)
    diagonal = [tf.abs(f) for f in factors.full_diagonal()]
    members = {}
    for label in ("none", "diagonal", "kfac_separate_5", "kfac_online_nearest"):
        keras.utils.set_random_seed(0)
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        ewc = None
        if label == "diagonal":
            ewc = fastewc.EWC(copy, lam=LAM)
            ewc.add_task(diagonal)
        elif label != "none":
            online = label == "kfac_online_nearest"
            ewc = fastewc.EWC(copy, lam=LAM, curvature="kfac", mode="online" if online else "separate",
                              kfac_sum="nearest" if online else "exact")
            for _ in range(1 if online else 5):
                ewc.add_task(fastewc.kfac_fisher(copy, (x, y), loss=problems.LOSS))
        step = fastewc.make_train_step(copy, keras.optimizers.Adam(1e-3), problems.LOSS, ewc=ewc,
                                       steps_per_call=STEPS)
        members[label] = lambda s=step: s(xs, ys).numpy()
    benchmark.group = f"kfac-train-step[{device}]"
    times = rotate(benchmark, members, rounds=3 if smoke else 25)
    benchmark.extra_info.update(batch=batch, medians=_medians(times))


# -- the report -----------------------------------------------------------------------------
def _vs(seconds, base):
    return f"{seconds * 1e3:.2f} ms ({seconds / base:.2f}×)"


def report(doc):
    """Markdown tables from a pytest-benchmark JSON of this suite."""
    benches = [b for b in doc["benchmarks"] if b["extra_info"].get("medians")]
    lines = []
    factors = [b for b in benches if b["name"].startswith("test_factors")]
    if factors:
        lines += ["| problem | kind | diagonal × floor | KFAC × floor | hand-written KFAC × floor | KFAC ÷ hand-written | KFAC / diagonal | first call: floor → diagonal / KFAC / hand-written |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for b in factors:
            m, first, info = b["extra_info"]["medians"], b["extra_info"]["first_call"], b["extra_info"]
            floor = min(m["floor_noxla"], m["floor_xla"])
            floor_first = first["floor_xla" if m["floor_xla"] < m["floor_noxla"] else "floor_noxla"]
            kernel_label = min(("handwritten_noxla", "handwritten_xla"), key=m.get)
            kernel = m[kernel_label]
            lines.append(f"| {info['problem']} | {info['kind']} | {m['diagonal'] / floor:.2f} | "
                         f"{m['kfac'] / floor:.2f} | {kernel / floor:.2f} | {m['kfac'] / kernel:.2f} | "
                         f"{m['kfac'] / m['diagonal']:.2f} | {floor_first:.2f} s → {first['diagonal']:.2f} / "
                         f"{first['kfac']:.2f} / {first[kernel_label]:.2f} s |")
        lines.append("")
    penalty = [b for b in benches if b["name"].startswith("test_penalty")]
    if penalty:
        lines += ["| tasks | diagonal | KFAC separate | KFAC online nearest | state MiB: diagonal / separate / nearest |",
                  "|---:|---:|---:|---:|---|"]
        for b in sorted(penalty, key=lambda b: b["extra_info"]["tasks"]):
            m, size = b["extra_info"]["medians"], b["extra_info"]["state_bytes"]
            mib = " / ".join(f"{size[k] / 2**20:.1f}" for k in ("diagonal", "kfac_separate", "kfac_online_nearest"))
            cells = [_vs(m[k], m["diagonal"]) for k in ("kfac_separate", "kfac_online_nearest")]
            lines.append(f"| {b['extra_info']['tasks']} | {m['diagonal'] * 1e3:.2f} ms | "
                         + " | ".join(cells) + f" | {mib} |")
        lines.append("")
    steps = [b for b in benches if b["name"].startswith("test_train_step")]
    if steps:
        lines += ["| batch | step, no EWC | diagonal EWC | KFAC separate, 5 tasks | KFAC online nearest |",
                  "|---:|---:|---:|---:|---:|"]
        for b in sorted(steps, key=lambda b: b["extra_info"]["batch"]):
            m = b["extra_info"]["medians"]
            base = m["none"]
            cells = [_vs(m[k] / STEPS, base / STEPS) for k in ("diagonal", "kfac_separate_5", "kfac_online_nearest")]
            lines.append(f"| {b['extra_info']['batch']} | {base / STEPS * 1e3:.2f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(report(json.load(fh)))
