"""What stays resident after ``EWC.consolidate`` at GPT-2 base size (issue 24 item 4).

One process: the GPT-2 classifier of :mod:`benchmarks.bench_large_train` (124.4M
parameters, 4 × 128 tokens), then, reading the resident set (``VmRSS``) and its
high-water mark (``VmHWM``) after each stage:

    model        the model and its data exist
    consolidate  EWC(model).consolidate(one batch, kind=KIND) returned (it trims, below, itself)
    gc           gc.collect()
    trim         glibc ``malloc_trim(0)`` (freed memory the allocator kept goes back)
    estimator    the EWC's estimator cache dropped (its ``_cache.FISHER_ESTIMATORS`` attribute), gc, trim
    step         one EWC ``make_train_step`` call (trace, compile, run), gc, trim

and the bytes the estimator holds as tensors (its cached zero state) before it is dropped.
A stage's drop in RSS is what that stage released; what ``trim`` releases was free memory
the allocator had not returned, not a live object.

    flock /tmp/fastewc-large.lock .venv/bin/python -m benchmarks.consolidate_memory [--tiny] [--kind empirical]
        [--jit 0|1] [--control]

``--jit`` passes ``jit_compile`` to ``consolidate`` (default: its default).  ``--control``
runs, in place of ``consolidate``, what TensorFlow alone does with the model: its floor
(one compiled forward+backward of the mean loss, :func:`benchmarks.problems.floor_function`,
with XLA unless ``--jit 0``), so that what stays after it is TensorFlow's, not fastewc's.

Prints one JSON line (bytes).
"""
import argparse
import ctypes
import gc
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastewc  # noqa: E402
from benchmarks import bench_large_train  # noqa: E402


def _status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(obj, seen=None):
    """Bytes of the tf.Tensors reachable through dicts, lists, tuples and namedtuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, tf.Tensor):
        return int(np.prod(obj.shape)) * obj.dtype.size
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def measure(tiny, kind, jit=None, control=False):
    stages = {}

    def mark(name):
        stages[name] = {"rss": _status("VmRSS"), "hwm": _status("VmHWM")}

    setup = bench_large_train.Setup("float32", tiny, with_ewc=False)
    mark("model")
    if control:
        from benchmarks import problems
        floor = problems.floor_function(setup.model, jit is not False, loss=setup.loss)
        floor(setup.x_step, setup.y_step)
        del floor
        gc.collect()
        mark("floor")
        _trim()
        mark("trim")
        return {"params": setup.params, "control": "floor", "jit": jit, "stages": stages}
    ewc = fastewc.EWC(setup.model, lam=bench_large_train.LAM)
    ewc.consolidate((setup.x_step, setup.y_step), loss=setup.loss, kind=kind, jit_compile=jit)
    mark("consolidate")
    gc.collect()
    mark("gc")
    _trim()
    mark("trim")
    cache = ewc.__dict__.get(fastewc._cache.FISHER_ESTIMATORS, {})
    held = {"estimator_tensor_bytes": sum(_tensor_bytes(vars(e)) for e in cache.values())}
    del cache
    ewc.__dict__.pop(fastewc._cache.FISHER_ESTIMATORS, None)
    gc.collect()
    _trim()
    mark("estimator")
    step = fastewc.make_train_step(setup.model, keras.optimizers.Adam(1e-4), setup.loss, ewc=ewc)
    float(step(setup.x_step, setup.y_step))
    gc.collect()
    _trim()
    mark("step")
    return {"params": setup.params, "state_bytes": ewc.state_bytes, "kind": kind, "jit": jit, **held,
            "stages": stages}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--kind", default="empirical")
    parser.add_argument("--jit", type=int, choices=(0, 1), default=None)
    parser.add_argument("--control", action="store_true")
    args = parser.parse_args(argv)
    jit = None if args.jit is None else bool(args.jit)
    print(json.dumps(measure(args.tiny, args.kind, jit, args.control)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
