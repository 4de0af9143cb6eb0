"""How much memory one compiled Fisher call may hold: the budget that sizes its chunks.

An engine holds, per example of a chunk, what its method needs at once (the factored
engine K deltas of every probe; vmap and jacobian the per-example gradients), so its rows
per call are ``budget // bytes_per_row``.  The budget is ``BUDGET_FRACTION`` of the
memory the device has:

* CPU: ``MemTotal`` of ``/proc/meminfo`` (Linux), else the physical pages
  (``os.sysconf``), else ``FALLBACK_BYTES``;
* GPU: the logical device's ``memory_limit`` when one was configured
  (``tf.config.experimental.get_memory_info`` reports what is in use, not the total),
  else ``FALLBACK_BYTES``.

The memory the device HAS, not what happens to be free when a plan is made: the rows fix
the batching, and the batching fixes the ``kind="sampled"`` draws of a seed and which
compiled functions exist, so they must not change from one run to the next with the
load of a shared machine.  ``BUDGET_FRACTION`` leaves room for the model, its
activations, the compiler and other processes.  The peak of a call is a small multiple of
what the engines count per row (``PEAK_PER_BYTE``: gradients of the deltas in flight, the
squares): MobileNetV2's exact Fisher peaked 0.8 GB higher when its deltas per call grew by
0.45 GB (issue 15's measurement, 2²⁴ → 2²⁷ floats), about 1.8×.  An explicit
``batch_size`` caps the rows further.
"""
import os

import tensorflow as tf

BUDGET_FRACTION = 0.125
FALLBACK_BYTES = 4 * 2**30
PEAK_PER_BYTE = 2


def device_bytes():
    """The memory of the default device, in bytes."""
    if tf.config.list_physical_devices("GPU"):
        return _gpu_total()
    return _host_total()


def budget_bytes():
    """What a compiled Fisher call may hold: ``BUDGET_FRACTION`` of :func:`device_bytes`."""
    return int(device_bytes() * BUDGET_FRACTION)


def rows_within(budget, bytes_per_row, cap):
    """``cap``, or fewer rows when ``bytes_per_row`` (times the peak factor) of ``cap`` rows
    do not fit in ``budget``: then the most that do, rounded down to a power of two
    (chunks split evenly); at least 1."""
    fit = max(1, budget // max(1, PEAK_PER_BYTE * bytes_per_row))
    return min(cap, 1 << (fit.bit_length() - 1))


def _host_total():
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BYTES


def _gpu_total():
    for physical in tf.config.list_physical_devices("GPU"):
        config = tf.config.get_logical_device_configuration(physical) or []
        limits = [c.memory_limit for c in config if getattr(c, "memory_limit", None)]
        if limits:
            return limits[0] * 2**20
    return FALLBACK_BYTES

