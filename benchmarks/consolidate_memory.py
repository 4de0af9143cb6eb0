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


def measure(tiny, kind):
    stages = {}

    def mark(name):
        stages[name] = {"rss": _status("VmRSS"), "hwm": _status("VmHWM")}

    setup = bench_large_train.Setup("float32", tiny, with_ewc=False)
    mark("model")
    ewc = fastewc.EWC(setup.model, lam=bench_large_train.LAM)
    ewc.consolidate((setup.x_step, setup.y_step), loss=setup.loss, kind=kind)
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
    return {"params": setup.params, "state_bytes": ewc.state_bytes, "kind": kind, **held, "stages": stages}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--kind", default="empirical")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.tiny, args.kind)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
