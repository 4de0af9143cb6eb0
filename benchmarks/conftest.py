import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke(request):
    """True under --benchmark-disable: run every benchmark once on tiny inputs."""
    return bool(request.config.getoption("benchmark_disable"))


def run(benchmark, fn, *, slow=False):
    """Time ``fn`` (which must force completion, e.g. with .numpy()) after a warm-up call.

    Slow baselines (eager loops, jacobian) get one timed round; fast paths get several.
    """
    if benchmark.disabled:
        return benchmark(fn)
    fn()  # warm-up: trace and compile outside the timed rounds
    if slow:
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    return benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
