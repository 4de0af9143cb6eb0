"""Bytes per parameter that the Fisher's float64 accumulation (one compiled
:func:`fastewc.engines.base.fold` of a batch's float32 sums) allocates above what is already
resident (the state: float64 totals and float32 mean, and the batch's sums), measured as the
process's resident high-water mark (VmHWM, reset through ``/proc/self/clear_refs``) over three
steady folds of 2**24 parameters.  Linear in the parameters: × P gives a model's share.

    .venv/bin/python -m benchmarks.fold_memory xla mean     # or noxla, nomean (with_mean=False)
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
    jit, with_mean = argv[0] == "xla", argv[1] == "mean"
    params = sum(int(tf.TensorShape(s).num_elements()) for s in SHAPES)
    state = base.initial_state(SHAPES)
    sums = [tf.ones(s, tf.float32) for s in SHAPES] + [tf.constant([0.0, 1.0])]
    count = tf.constant(4, tf.int32)
    fold = tf.function(lambda s, c, st: base.fold(s, c, st, with_mean=with_mean), jit_compile=jit,
                       autograph=False)
    fold(sums, count, state).checks.numpy()          # trace and compile
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for _ in range(3):
        fold(sums, count, state).checks.numpy()
    print(json.dumps({"jit_compile": jit, "with_mean": with_mean, "params": params,
                      "bytes_per_param_above_resident": (_status("VmHWM") - resident) / params}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
