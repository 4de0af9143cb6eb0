"""Bytes per parameter that the Fisher's accumulation allocates above what is already
resident (the state and the batch's float32 sums), measured as the process's resident
high-water mark (VmHWM, reset through ``/proc/self/clear_refs``) over three steady steps of
2**24 parameters, each step compiled as the engines run it (:mod:`fastewc.engines.base`):

* ``mean``: a one-batch call's :func:`~fastewc.engines.base.mean` (sums / count, float32);
* ``fold``: a longer call's :func:`~fastewc.engines.base.fold` of one batch into float64
  totals (the state holds the totals);
* ``finish``: its :func:`~fastewc.engines.base.finish` (the means, once per call).

Linear in the parameters: × P gives a model's share.

    .venv/bin/python -m benchmarks.fold_memory noxla fold     # or xla; mean, finish
"""
import json
import re
import sys

import tensorflow as tf

from fastewc.engines import base

SHAPES = [(4096, 1024), (2048, 2048), (1024, 4096), (2**22,)]      # 2**24 parameters


def _status(field):
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


def main(argv=None):
    jit, step = argv[0] == "xla", argv[1]
    params = sum(int(tf.TensorShape(s).num_elements()) for s in SHAPES)
    batch = base.BatchSums(tuple(tf.ones(s, tf.float32) for s in SHAPES), [], tf.constant([0.0, 1.0]))
    count = tf.constant(4, tf.int32)
    state = base.initial_state()
    if step != "mean":
        state = base.fold(batch, count, state)              # float64 totals resident
    fn = {"mean": base.mean, "fold": base.fold, "finish": lambda b, c, s: base.finish(s)}[step]
    compiled = tf.function(fn, jit_compile=jit, autograph=False)
    compiled(batch, count, state).checks.numpy()           # trace and compile
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for _ in range(3):
        compiled(batch, count, state).checks.numpy()
    print(json.dumps({"jit_compile": jit, "step": step, "params": params,
                      "bytes_per_param_above_resident": (_status("VmHWM") - resident) / params}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
