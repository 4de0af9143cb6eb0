"""Record TensorBoard profiler traces of fastewc's reference workloads.

    python -m profiles.capture                      # every capture into profiles/runs/
    python -m profiles.capture --only mlp --small   # tiny inputs (tests, smoke runs)
    python -m profiles.capture --list

One capture = one ``tf.profiler.experimental.start(logdir) ... stop()`` session around a
few steady-state iterations (warm-up, i.e. tracing and XLA compilation, happens before
``start``), written to ``<out>/<capture>/plugins/profile/<timestamp>/<host>.xplane.pb``
with a ``capture.json`` that records what was run.  ``tensorboard --logdir <out>`` (with
tensorboard-plugin-profile) shows one run per capture; ``python -m profiles.summarize
<out>`` reads the traces back.

Captures, for each reference workload of ``benchmarks/problems.py`` (``mlp``, ``cnn``):

* ``<w>_train_eager``: the EWC training loop written the usual way -- an eager
  ``tf.GradientTape`` step, ``loss = loss_fn(y, model(x)) + ewc.penalty()``, then
  ``optimizer.apply`` (Adam), 8 mini-batches of 128.
* ``<w>_train_compiled``: the same steps through ``fastewc.make_train_step(..., ewc=ewc)``
  (XLA or not as its device default decides).
* ``<w>_fisher_loop`` / ``<w>_fisher_factored``: ``fastewc.fisher_diagonal`` over the
  workload's examples with ``method="loop"`` (the eager per-example baseline, 1 call) and
  ``method="factored"`` (5 calls).

Labels.  Three names mark fastewc's work in every trace:

* ``fastewc/train_step``, ``fastewc/fisher``: TraceMe annotations
  (``tf.profiler.experimental.Trace``, with ``step_num`` so TensorBoard's overview shows
  steps) around each Python-level call here.  They are needed: XLA-compiled functions
  drop ``tf.name_scope`` from the events they emit (HLO instruction names such as
  ``multiply_multiply_fusion.4``), and eager ops carry no scope at all.
* ``fastewc/penalty``: a ``tf.name_scope`` inside the compiled penalty
  (fastewc/penalty.py), so its ops are named ``.../fastewc/penalty/mul:Mul`` when run by
  TensorFlow's executor; in the eager loop an annotation of the same name also wraps the
  ``ewc.penalty()`` call.  Inside an XLA step the scope survives only in the HLO
  metadata, which the summarizer reads from the trace (profiles/summarize.py).

The library's own scopes (``fastewc/train_step`` in fastewc/train.py, ``fastewc/fisher``
in fastewc/fisher.py) also name the graph ops of non-XLA functions.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:                      # benchmarks/ is not an installed package
    sys.path.insert(0, _ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastewc  # noqa: E402
from benchmarks import problems  # noqa: E402

SCOPES = ("fastewc/fisher", "fastewc/penalty", "fastewc/train_step")
WORKLOADS = ("mlp", "cnn")
KINDS = ("train_eager", "train_compiled", "fisher_loop", "fisher_factored")
CAPTURES = tuple(f"{w}_{k}" for w in WORKLOADS for k in KINDS)
DEFAULT_OUT = os.path.join("profiles", "runs")

LAM = 100.0               # EWC strength (any value: timing does not depend on it)
TRAIN_BATCH = 128         # mini-batch of the train captures (small: 4)
TRAIN_STEPS = 8           # traced optimizer steps (small: 2)
FISHER_BATCH = 256        # fisher_diagonal batch_size
FACTORED_CALLS = 5        # traced fisher_diagonal calls, factored (small: 2)
WARMUP = 3                # untraced iterations first (trace, compile, caches)


def machine():
    """CPU model, core counts and versions, recorded in every capture.json."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "python": platform.python_version(), "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- the workloads ----------------------------------------------------------------------
class Job:
    """What one capture runs: ``run(i)`` is one traced iteration (it forces completion)."""

    def __init__(self, run, *, iterations, warmup, unit, description, **details):
        self.run, self.iterations, self.warmup = run, iterations, warmup
        self.unit, self.description, self.details = unit, description, details


def _consolidated(workload, small, fisher_kind):
    """(model, x, y_task_b, ewc): the workload's model with task A consolidated."""
    model, x, y = problems.make(workload, small=small)
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.consolidate((x, y), loss=problems.LOSS, kind=fisher_kind, method="factored")
    return model, x, (y + 1) % problems.CLASSES, ewc


def _batches(x, y, batch):
    return [(tf.constant(x[i:i + batch]), tf.constant(y[i:i + batch]))
            for i in range(0, len(x) - batch + 1, batch)]


def _train_eager(workload, small, fisher_kind):
    model, x, y, ewc = _consolidated(workload, small, fisher_kind)
    batch = 4 if small else TRAIN_BATCH
    batches = _batches(x, y, batch)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    loss_fn = problems.LOSS

    def run(i):
        xb, yb = batches[i % len(batches)]
        with tf.profiler.experimental.Trace("fastewc/train_step", step_num=i, _r=1):
            with tf.GradientTape() as tape:
                data_loss = loss_fn(yb, model(xb, training=True))
                with tf.profiler.experimental.Trace("fastewc/penalty"):
                    penalty = ewc.penalty()
                loss = data_loss + penalty
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return float(loss)

    return Job(run, iterations=2 if small else TRAIN_STEPS, warmup=WARMUP, unit="step",
               description=f"eager GradientTape step + ewc.penalty(), Adam, batch {batch}",
               batch_size=batch, examples=len(x))


def _train_compiled(workload, small, fisher_kind):
    model, x, y, ewc = _consolidated(workload, small, fisher_kind)
    batch = 4 if small else TRAIN_BATCH
    batches = _batches(x, y, batch)
    step = fastewc.make_train_step(model, keras.optimizers.Adam(1e-3), problems.LOSS, ewc=ewc)

    def run(i):
        xb, yb = batches[i % len(batches)]
        with tf.profiler.experimental.Trace("fastewc/train_step", step_num=i, _r=1):
            return float(step(xb, yb))

    xla = "XLA" if step.jit_compile else "no XLA"
    return Job(run, iterations=2 if small else TRAIN_STEPS, warmup=WARMUP, unit="step",
               description=f"fastewc.make_train_step(ewc=...) ({xla}), Adam, batch {batch}",
               batch_size=batch, examples=len(x), jit_compile=step.jit_compile)


def _fisher(method):
    def build(workload, small, fisher_kind):
        model, x, y = problems.make(workload, small=small)
        data = (tf.constant(x), tf.constant(y))

        def run(i, data=data):
            with tf.profiler.experimental.Trace("fastewc/fisher", step_num=i, _r=1):
                fisher = fastewc.fisher_diagonal(model, data, loss=problems.LOSS, kind=fisher_kind,
                                                 method=method, batch_size=FISHER_BATCH)
                return float(tf.reduce_sum(fisher[-1]))

        if method == "loop":   # nothing to compile: warm eager kernels on 2 examples only
            warm_data = (data[0][:2], data[1][:2])
            warm = lambda i: run(i, warm_data)  # noqa: E731
            iterations = 1
        else:
            warm, iterations = run, 2 if small else FACTORED_CALLS
        job = Job(run, iterations=iterations, warmup=WARMUP, unit="call",
                  description=f"fisher_diagonal(kind={fisher_kind!r}, method={method!r}) "
                              f"over {len(x)} examples",
                  examples=len(x), fisher_kind=fisher_kind, method=method)
        job.warm = warm
        return job
    return build


BUILDERS = {"train_eager": _train_eager, "train_compiled": _train_compiled,
            "fisher_loop": _fisher("loop"), "fisher_factored": _fisher("factored")}


# -- capturing ----------------------------------------------------------------------------
def select(only):
    """Capture names matching ``only`` (comma-separated names, workloads or kinds)."""
    if not only:
        return list(CAPTURES)
    def matches(token, name):
        return token in (name, *name.split("_", 1))

    tokens = [t.strip() for t in only.split(",") if t.strip()]
    chosen = [c for c in CAPTURES if any(matches(t, c) for t in tokens)]
    unknown = [t for t in tokens if not any(matches(t, c) for c in CAPTURES)]
    if unknown or not chosen:
        raise SystemExit(f"`--only` must name captures, workloads or kinds. Received: "
                         f"--only={only!r} (unknown: {', '.join(unknown) or only}). Choose among "
                         f"{', '.join(CAPTURES)}, a workload ({', '.join(WORKLOADS)}) or a kind "
                         f"({', '.join(KINDS)}).")
    return chosen


def xplane_files(logdir):
    """The ``.xplane.pb`` files under ``logdir``, oldest first."""
    return sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))


def capture(name, out, *, small=False, fisher_kind="empirical", log=print):
    """Warm up, then trace ``name``'s iterations into ``<out>/<name>``; returns the
    capture.json record (with the path of the written ``.xplane.pb``)."""
    workload, kind = name.split("_", 1)
    job = BUILDERS[kind](workload, small, fisher_kind)
    warm = getattr(job, "warm", job.run)
    t0 = time.perf_counter()
    for i in range(job.warmup):
        warm(i)
    warm_s = time.perf_counter() - t0

    logdir = os.path.join(out, name)
    shutil.rmtree(os.path.join(logdir, "plugins", "profile"), ignore_errors=True)
    os.makedirs(logdir, exist_ok=True)
    options = tf.profiler.experimental.ProfilerOptions(
        host_tracer_level=2, python_tracer_level=0, device_tracer_level=1)
    t0 = time.perf_counter()
    tf.profiler.experimental.start(logdir, options=options)
    try:
        for i in range(job.iterations):
            job.run(i)
        traced_s = time.perf_counter() - t0
    finally:
        tf.profiler.experimental.stop()
    files = xplane_files(logdir)
    if not files:
        raise RuntimeError(f"The profiler wrote no .xplane.pb under {logdir}.")
    record = {
        "name": name, "workload": workload, "kind": kind, "small": small,
        "description": job.description, "iterations": job.iterations, "unit": job.unit,
        "warmup": job.warmup, "warmup_s": round(warm_s, 3), "traced_s": round(traced_s, 3),
        "xplane": os.path.relpath(files[-1], logdir), **job.details, "machine": machine(),
    }
    with open(os.path.join(logdir, "capture.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    log(f"  {name}: {job.description}; {job.iterations} {job.unit}(s) traced in "
        f"{traced_s:.2f} s (warm-up {warm_s:.2f} s) -> {files[-1]} "
        f"({os.path.getsize(files[-1]) / 1e6:.1f} MB)", flush=True)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m profiles.capture",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"root log directory (default {DEFAULT_OUT})")
    parser.add_argument("--only", default="", metavar="NAME[,NAME]",
                        help="captures, workloads (mlp, cnn) or kinds (train_eager, ...) to run")
    parser.add_argument("--small", action="store_true", help="8 examples, 2 iterations (tests)")
    parser.add_argument("--kind", default="empirical", choices=["empirical", "sampled", "exact"],
                        help="Fisher kind of the fisher_* captures and the consolidation")
    parser.add_argument("--list", action="store_true", help="list the capture names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CAPTURES))
        return 0
    names = select(args.only)
    print(f"profiles.capture: {len(names)} capture(s) into {args.out}"
          f"{' (small)' if args.small else ''}; TensorFlow {tf.__version__}", flush=True)
    for k, name in enumerate(names, 1):
        print(f"[{k}/{len(names)}] {name}: warming up, then tracing", flush=True)
        capture(name, args.out, small=args.small, fisher_kind=args.kind)
    print(f"done. Summary: python -m profiles.summarize {args.out}; "
          f"viewer: tensorboard --logdir {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
