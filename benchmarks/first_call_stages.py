"""The first call split into stages, one member per process (issue 24: first call ≤ 2× the
floor's): GPT-2 (:data:`SIZES`: ``small`` is GPT-2 base's 12 layers at hidden 64, whose op
counts are base's; ``base`` is GPT-2 base), Dense(10) on the last token, 4 × 128 tokens;
or a row of :mod:`benchmarks.bench_large` (:data:`LARGE`: ``mobilenet_v2``, ``resnet50``,
its model and examples); or a reference problem of :mod:`benchmarks.problems` (``mlp``,
``cnn``).

Stages (seconds, JSON on the last line):

* ``plan_s``: the Fisher's planning pass (eager, one example; floors: none);
* ``trace_s``: Python tracing to a concrete function (the floor's
  ``get_concrete_function``; the Fisher engine's ``_concrete_for``);
* ``first_run_s``: the concrete function's first call: instantiation (Grappler, unless
  skipped: ``_policy.skip_graph_optimizer``), with XLA the lowering to HLO and the
  compilation, and one run; ``steady_s`` its second call (a run alone), so
  ``first_run_s - steady_s`` is what the first call adds;
* ``steps``: the fold/finish step functions of a call of several batches
  (``Engine._step``) within ``first_run_s``: their seconds in all, each function's first
  call (trace, instantiation, one run) and trace, the later calls, and their op counts;
* with ``--dump DIR`` (XLA only): ``xla`` splits ``first_run_s`` by the XLA dump's file
  times (``XLA_FLAGS=--xla_dump_to``): until the HLO module exists (instantiation and the
  TF → HLO lowering), HLO passes, code generation (writing the dump costs time too).

Also the batch function's ops: total, ``Const``, by type, and by scope (``rules/`` the rules'
square sums, ``gradient_tape`` the backward pass, the rest the forward pass and checks), and
what reads the constants.

    .venv/bin/python -m benchmarks.first_call_stages small empirical [--jit 0|1] [--dump DIR]
    .venv/bin/python -m benchmarks.first_call_stages base floor_xla
    .venv/bin/python -m benchmarks.first_call_stages mobilenet_v2 empirical [--batch-size 4]
    .venv/bin/python -m benchmarks.first_call_stages cnn exact --curvature kfac   # benchmarks.problems
"""
import argparse
import collections
import glob
import json
import os
import sys
import time

MEMBERS = ("floor_xla", "floor_noxla", "empirical", "sampled", "exact")
PROBLEMS = ("mlp", "cnn")      # benchmarks.problems' reference models (their floor: LOSS)
SIZES = {"small": dict(vocabulary_size=1000, num_layers=12, num_heads=2, hidden_dim=64, intermediate_dim=128,
                       max_sequence_length=128),
         "base": dict(vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
                      max_sequence_length=1024)}
LARGE = ("mobilenet_v2", "resnet50")
RESULT_TAG = "STAGES "


def _scope(name):
    for part in ("rules/", "gradient_tape", "gradients"):
        if part in name:
            return part.rstrip("/")
    return "forward"


def op_summary(graph):
    """Op counts of ``graph``: total, Const, by type (top 15), by scope, constants by reader."""
    ops = graph.get_operations()
    readers = collections.Counter()
    for op in ops:
        for t in op.inputs:
            if t.op.type == "Const":
                readers[op.type] += 1
    return {"ops": len(ops), "const": sum(op.type == "Const" for op in ops),
            "by_type": dict(collections.Counter(op.type for op in ops).most_common(15)),
            "by_scope": dict(collections.Counter(_scope(op.name) for op in ops)),
            "const_by_scope": dict(collections.Counter(_scope(op.name) for op in ops if op.type == "Const")),
            "const_readers": dict(readers.most_common(12))}


def xla_split(dump, start, end):
    """Stage ends from the dump's file times, relative to ``start`` (seconds)."""
    files = glob.glob(os.path.join(dump, "*"))

    def first(pattern):
        times = [os.path.getmtime(f) for f in files if pattern in os.path.basename(f)]
        return min(times) - start if times else None

    def last(pattern):
        times = [os.path.getmtime(f) for f in files if pattern in os.path.basename(f)]
        return max(times) - start if times else None

    return {"hlo_ready_s": first("before_optimizations"), "hlo_passes_done_s": last("after_optimizations"),
            "last_file_s": max((os.path.getmtime(f) for f in files), default=start) - start,
            "call_s": end - start, "files": len(files)}


class _StepTimes:
    """Times of ``Engine._step`` (the fold and finish functions of a call of several
    batches): each call's seconds by function, and of those the trace
    (``Engine._step_function`` making the concrete function)."""

    def __init__(self):
        self.calls, self.traces = collections.defaultdict(list), {}

    def first_call(self, engine, summary):
        """``steps_s``: every step call's seconds; ``first_s``: the first call of each
        function (trace, instantiation, one run); ``trace_s``; ``later_s``: the others;
        ``graph``: each function's op count."""
        first = {k: v[0] for k, v in self.calls.items()}
        return {"steps_s": sum(sum(v) for v in self.calls.values()), "first_s": first,
                "trace_s": dict(self.traces), "later_s": {k: v[1:] for k, v in self.calls.items()},
                "ops": {k: summary(c.graph)["ops"] for k, c in engine._steps.items()}}


def _time_steps(base):
    """Wrap ``Engine._step`` and ``Engine._step_function`` to time them (:class:`_StepTimes`)."""
    times, step, step_function = _StepTimes(), base.Engine._step, base.Engine._step_function

    def timed_step(self, fn, *args):
        begin = time.perf_counter()
        try:
            return step(self, fn, *args)
        finally:
            times.calls[fn.__name__].append(time.perf_counter() - begin)

    def timed_function(self, fn, args):
        begin, new = time.perf_counter(), fn.__name__ not in self._steps
        try:
            return step_function(self, fn, args)
        finally:
            if new:
                times.traces[fn.__name__] = time.perf_counter() - begin
    base.Engine._step, base.Engine._step_function = timed_step, timed_function
    return times


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("size", choices=tuple(SIZES) + LARGE + PROBLEMS)
    parser.add_argument("member", choices=MEMBERS)
    parser.add_argument("--jit", type=int, default=None, help="the Fisher's jit_compile (default: its default)")
    parser.add_argument("--batch-size", type=int, default=None, help="the Fisher's batch_size")
    parser.add_argument("--curvature", default=None, help="the Fisher's curvature (default: its default)")
    parser.add_argument("--dump", default=None, help="XLA dump directory (set before TensorFlow starts)")
    args = parser.parse_args(argv)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump}").strip()
    import numpy as np
    import keras
    import fastewc
    from benchmarks import models, problems
    from fastewc.engines import base

    if args.size in PROBLEMS:
        model, x, y = problems.make(args.size)
    elif args.size in LARGE:
        from benchmarks import bench_large
        model, x, y = bench_large.make(args.size, False)
    else:
        keras.utils.set_random_seed(0)
        model = models.gpt2_classifier(SIZES[args.size])
        rng = np.random.default_rng(0)
        x, y = models._gpt2_inputs(rng, 4, 128), rng.integers(0, models.CLASSES, 4).astype(np.int32)
    out = {"size": args.size, "member": args.member}
    if args.member.startswith("floor"):
        floor = problems.floor_function(model, args.member == "floor_xla", models.LOSS)
        start = time.perf_counter()
        concrete = floor.function.get_concrete_function(x, y)
        out["trace_s"] = time.perf_counter() - start
        out["graph"] = op_summary(concrete.graph)
        run = lambda: floor(x, y)     # noqa: E731
    else:
        options = {} if args.jit is None else {"jit_compile": bool(args.jit)}
        if args.batch_size:
            options["batch_size"] = args.batch_size
        if args.curvature:
            options["curvature"] = args.curvature
        estimator = fastewc.FisherEstimator(model, loss=models.LOSS, kind=args.member, **options)
        start = time.perf_counter()
        plan = estimator.plan((x, y))
        out["plan_s"] = time.perf_counter() - start
        out["jit_compile"] = bool(plan.engine.jit_compile)
        out["rows"] = plan.rows
        alone = plan.rows >= len(y)       # else the first batch is one of several: the other function
        traced = {"s": 0.0}
        concrete_for = base.Engine._concrete_for

        def timed(self, *a, **k):
            begin = time.perf_counter()
            try:
                return concrete_for(self, *a, **k)
            finally:
                traced["s"] += time.perf_counter() - begin
        base.Engine._concrete_for = timed
        seed = dict(seed=0) if args.member == "sampled" else {}
        try:      # trace alone first, as the estimator's first batch of an `auto` plan does
            from fastewc import data as data_lib
            batch = next(data_lib.Source((x, y)).batches(plan.rows, plan.cast, lambda labels: labels))
            noise = estimator._noise(seed.get("seed", 0), batch, plan)
            plan.engine.trace(batch, noise, estimator._initial_state(plan.engine), alone=alone)
            out["trace_s"] = traced["s"]
            concrete = plan.engine._concrete[(int(batch.mask.shape[0]), alone)]
            out["graph"] = op_summary(concrete.graph)
            out["grappler_skipped"] = bool(fastewc._policy.skip_graph_optimizer(concrete.graph))
        finally:
            base.Engine._concrete_for = concrete_for
        import tensorflow as tf
        run = lambda: [t.numpy() for t in tf.nest.flatten(estimator((x, y), **seed))   # noqa: E731
                       if isinstance(t, tf.Tensor)][-1]
        steps = _time_steps(base)
    wall, start = time.time(), time.perf_counter()
    run()
    out["first_run_s"] = time.perf_counter() - start
    if not args.member.startswith("floor"):
        out["steps"] = steps.first_call(plan.engine, op_summary)
    if args.dump:
        out["xla"] = xla_split(args.dump, wall, time.time())
    start = time.perf_counter()
    run()
    out["steady_s"] = time.perf_counter() - start
    out["first_call_s"] = out.get("plan_s", 0.0) + out["trace_s"] + out["first_run_s"]
    print(RESULT_TAG + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
