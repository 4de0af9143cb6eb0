"""Peak memory of one call: the device allocator's peak where the device reports it (GPU),
else the process resident set size sampled every 2 ms above its value before the call."""
import os
import threading
import time

import tensorflow as tf

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss():
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(fn, device):
    """Run ``fn()``; return (result, peak bytes used during it, how it was measured)."""
    if device.startswith("GPU"):
        tf.config.experimental.reset_memory_stats(device)
        result = fn()
        return result, tf.config.experimental.get_memory_info(device)["peak"], "device allocator peak"
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return result, peak[0] - base, "process RSS above baseline"
