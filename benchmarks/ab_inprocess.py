"""An older commit's fastewc against this tree's, side by side in ONE process: the train
step, the penalty, the factored Fisher and the Kronecker factors, members alternating round
by round.

    .venv/bin/python -m benchmarks.ab_inprocess 08c890d [--rounds 150]
        [--only step|penalty|fisher|kfac] [--problems transformer cnn]
        [--kinds empirical sampled exact] [--curvatures kfac diagonal]

Why: ``benchmarks.compare`` runs each tree in its own processes, and on a shared machine
the same code's time differs from one process to the next by more than the 5 % to be
resolved (README, "The penalty and train-step suites against 08c890d, rerun").  Here both
versions run in one process, so that spread hits both alike; a process-wide side effect
of importing either version hits both too (the compare's same-code rows check that).

How: ``git archive REF fastewc`` is unpacked into a temporary directory as the package
``fastewc_<sha>`` (every whole word ``fastewc`` in its .py files renamed), which is
imported beside this tree's ``fastewc``.  Both build their own model (same seed),
optimizer and EWC on the same data, so neither step sees the other's state.

Members (``--only`` picks one group):
  step      the bench_train_step workload: MLP 784-256-256-10, batch 32, Adam, an EWC of
            2 tasks (λ = 100), 10 steps per round; ``make_train_step`` with and without
            EWC, ``jit_compile`` False (tffunc) and True (xla)
  penalty   bench_penalty's fused variants at T = 5 on its 10M-parameter MLP:
            ``tf.function(ewc.penalty_and_gradients)`` (fused_direct) and a tape over
            ``ewc.penalty()`` under ``jit_compile=True`` (fused_xla)
  fisher    bench_fisher's factored rows: ``fisher_diagonal(..., method="factored")`` of
            ``--problems`` (``benchmarks.problems``, default transformer and cnn) for each of
            ``--kinds``, one model per version and problem (same seed and data)
  kfac      bench_kfac's factor rows: a warm ``FisherEstimator(model, loss=..., kind=...,
            curvature=...)`` of ``--problems`` (here ``mlp`` and ``cnn``: the reference MLP on
            512 examples, the CNN on 256) called again on the same NumPy data with
            ``seed=0``, default arguments, for each of ``--kinds`` and ``--curvatures``
            (``kfac``: the factors; ``diagonal``: the suite's diagonal member); the
            repeated call's host time is in it

Prints each member's median and, for each pair, the median of the per-round ratios
new / old with their quartiles (< 1: this tree faster) and the ratio of the medians.
"""
import argparse
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import fastewc
from benchmarks import problems

ROOT = Path(__file__).resolve().parents[1]
STEPS, TASKS, LAM = 10, 2, 100.0


def import_old(ref, into):
    """``fastewc`` of commit ``ref`` as the module ``fastewc_<sha>`` (unpacked into ``into``)."""
    sha = subprocess.run(["git", "rev-parse", "--short=7", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    name = f"fastewc_{sha}"
    archive = subprocess.run(["git", "archive", sha, "fastewc"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = Path(into) / name
    (Path(into) / "fastewc").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bfastewc\b", name, path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def step_member(pkg, with_ewc, jit, batch=32):
    keras.utils.set_random_seed(0)
    model = problems.mlp()
    variables = model.trainable_variables
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.normal(size=(batch, 784)).astype(np.float32)) for _ in range(STEPS)]
    ys = [tf.constant(rng.integers(0, problems.CLASSES, size=(batch,)).astype(np.int32))
          for _ in range(STEPS)]
    ewc = None
    if with_ewc:
        ewc = pkg.EWC(model, lam=LAM)
        for t in range(TASKS):
            ewc.add_task([tf.random.stateless_uniform(v.shape, seed=[t, i]) for i, v in enumerate(variables)],
                         [v + 0.01 * tf.random.stateless_normal(v.shape, seed=[t + 100, i])
                          for i, v in enumerate(variables)])
    step = pkg.make_train_step(model, optimizer, problems.LOSS, ewc=ewc, jit_compile=jit)

    def rounds():
        for x, y in zip(xs, ys):
            value = step(x, y)
        return value.numpy()
    return rounds


def penalty_members(pkg, label, tasks=5):
    """bench_penalty's Problem with an EWC of ``pkg``, advanced to ``tasks`` tasks."""
    from benchmarks.bench_penalty import LAM as PENALTY_LAM, Problem
    problem = Problem()
    problem.ewc = pkg.EWC(problem.model, lam=PENALTY_LAM)
    problem.advance_to(tasks)

    def member(variant):
        fn = problem.fn(variant, tasks)

        def run():
            value, grads = fn()
            grads[-1].numpy()
            return value.numpy()
        return run
    return {f"{label}-{v}": member(v) for v in ("fused_direct", "fused_xla")}


def fisher_members(pkg, label, names, kinds):
    """bench_fisher's factored rows under ``pkg``: for each problem its own model (same seed)."""
    members = {}
    for name in names:
        model, x, y = problems.make(name)
        for kind in kinds:
            def run(model=model, x=x, y=y, kind=kind):
                fisher = pkg.fisher_diagonal(model, (x, y), loss=problems.LOSS, kind=kind, method="factored",
                                             batch_size=len(x), seed=0)
                return fisher[0].numpy()
            members[f"{label}-{name}.{kind}"] = run
    return members


def kfac_members(pkg, label, names, kinds, curvatures):
    """bench_kfac's factor rows under ``pkg``: a warm estimator's repeated call, as the suite
    times it (``estimator((x, y), seed=0)``), for each problem on its own model (same seed)."""
    members = {}
    for name in names:
        model, x, y = problems.make(name)
        for kind in kinds:
            for curvature in curvatures:
                estimator = pkg.FisherEstimator(model, loss=problems.LOSS, kind=kind, curvature=curvature)
                members[f"{label}-{name}.{kind}.{curvature}"] = (
                    lambda e=estimator, x=x, y=y: e((x, y), seed=0) and None)
    return members


def rotate(members, rounds):
    for fn in members.values():       # trace, compile, warm up
        fn()
        fn()
    times, order = {k: [] for k in members}, list(members)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            members[k]()
            times[k].append(time.perf_counter() - start)
    return times


def report(label, times, per):
    for k, t in times.items():
        print(f"{label} {k}: median {statistics.median(t) * 1e3 / per:.3f} ms, min {min(t) * 1e3 / per:.3f} ms")
    for kind in sorted({k.split("-", 1)[1] for k in times}):
        new, old = times[f"new-{kind}"], times[f"old-{kind}"]
        ratios = sorted(a / b for a, b in zip(new, old))
        q = lambda p: ratios[round(p * (len(ratios) - 1))]   # noqa: E731
        print(f"{label} {kind}: new / old per round {statistics.median(ratios):.3f} (quartiles "
              f"{q(0.25):.3f}-{q(0.75):.3f}); ratio of medians "
              f"{statistics.median(new) / statistics.median(old):.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_inprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--only", choices=("step", "penalty", "fisher", "kfac"), default=None)
    parser.add_argument("--problems", nargs="+", default=None,
                        help="fisher: default transformer cnn; kfac: default mlp cnn")
    parser.add_argument("--kinds", nargs="+", default=["empirical", "sampled", "exact"])
    parser.add_argument("--curvatures", nargs="+", default=["kfac"], choices=("kfac", "diagonal"))
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="fastewc-ab-")
    try:
        old = import_old(args.ref, tmp)
        print(f"old: {old.__name__} from {old.__file__}; new: fastewc from {fastewc.__file__}")
        pkgs = (("old", old), ("new", fastewc))
        if args.only in (None, "step"):
            for jit in (False, True):
                members = {f"{n}-{'ewc' if e else 'noewc'}": step_member(p, e, jit)
                           for e in (True, False) for n, p in pkgs}
                report(f"step {'xla' if jit else 'tffunc'} (per step)", rotate(members, args.rounds), STEPS)
        if args.only in (None, "penalty"):
            members = {**penalty_members(old, "old"), **penalty_members(fastewc, "new")}
            report("penalty T=5", rotate(members, max(args.rounds // 2, 10)), 1)
        if args.only in (None, "fisher"):
            names = args.problems or ["transformer", "cnn"]
            members = {**fisher_members(old, "old", names, args.kinds),
                       **fisher_members(fastewc, "new", names, args.kinds)}
            report("fisher factored", rotate(members, max(args.rounds // 5, 10)), 1)
        if args.only in (None, "kfac"):
            names = args.problems or ["mlp", "cnn"]
            members = {**kfac_members(old, "old", names, args.kinds, args.curvatures),
                       **kfac_members(fastewc, "new", names, args.kinds, args.curvatures)}
            report("kfac factors", rotate(members, max(args.rounds // 5, 10)), 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
