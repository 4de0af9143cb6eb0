"""The peak resident memory of each stage of ``EWC.consolidate`` at GPT-2 base (issue 24
item 4), in one process: ``EWC.consolidate``'s steps replayed one by one (the estimator
made, the Fisher, the task, the merge of each block kind, the commit, then the Fisher and
the merge's results dropped and the free memory released), the high-water mark reset
(``/proc/self/clear_refs``) after each, so that each stage's ``hwm_gib`` is its own peak.

    flock /tmp/fastewc-large.lock .venv/bin/python -m benchmarks.consolidate_stages [tiny]

Prints one JSON line (GiB).  It follows ``fastewc.EWC.consolidate`` and ``add_task`` as
they are written; keep the two in step.
"""
import gc
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastewc  # noqa: E402
from benchmarks import bench_large_train  # noqa: E402
from benchmarks.consolidate_memory import _status  # noqa: E402
from fastewc import _allocator, blocks  # noqa: E402


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(tiny):
    stages = {}

    def mark(name):
        stages[name] = {"rss_gib": round(_status("VmRSS") / 2**30, 3),
                        "hwm_gib": round(_status("VmHWM") / 2**30, 3)}
        _reset_peak()

    setup = bench_large_train.Setup("float32", tiny, with_ewc=False)
    _reset_peak()
    mark("model")
    ewc = fastewc.EWC(setup.model, lam=bench_large_train.LAM)
    mark("ewc")
    with ewc._lock:
        source = ewc._tracking.task_model(None)
        estimator = ewc._estimator(source, loss=setup.loss, kind="empirical", method="auto", batch_size=None,
                                   rules=None, num_samples=1, jit_compile=None, curvature=ewc.curvature,
                                   positions="sum")
        mark("estimator_made")
        fisher = estimator((setup.x_step, setup.y_step))
        mark("fisher")
        task = blocks.task(ewc.curvature, fisher, None, source, ewc._tracking)
        mark("task")
        merged = ewc._state.merge(task, blocks.kinds_of(ewc.curvature), ewc._tracking)
        mark("merge")
        with ewc.state_guard.exclusive():
            try:
                ewc._state.commit(*merged)
            finally:
                ewc._tracking.invalidate()
                ewc._sync_structure()
        mark("commit")
    del fisher, task, merged
    gc.collect()
    _allocator.release_free_memory()
    mark("released")
    return {"params": setup.params, "state_bytes": ewc.state_bytes, "stages": stages}


if __name__ == "__main__":
    print(json.dumps(measure(len(sys.argv) > 1 and sys.argv[1] == "tiny")), flush=True)
