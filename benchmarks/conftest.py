"""Shared benchmark machinery: device parametrization, smoke mode, warm-up and timing.

Every benchmark runs once per visible device: ``CPU:0`` always, plus each GPU that
``tf.config.list_logical_devices("GPU")`` finds, with ids ending in the device name, e.g.
``test_fisher[mlp-fisher-factored-exact-CPU:0]``.  The whole test (model building
included) runs under ``tf.device(...)`` so variables live on the device being measured.

``FASTEWC_BENCH_LOGICAL_CPUS=N`` splits the CPU into N logical devices and benchmarks each
(how the tests prove the parametrization on a machine without GPUs).
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_LOGICAL_CPUS = int(os.environ.get("FASTEWC_BENCH_LOGICAL_CPUS", "0") or 0)
if _LOGICAL_CPUS > 1:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration() for _ in range(_LOGICAL_CPUS)])


def bench_devices():
    """Device names to benchmark on: CPU:0 (or every logical CPU if split), then GPUs."""
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    cpus = cpus if _LOGICAL_CPUS > 1 else cpus[:1]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return [name.split("device:", 1)[-1] for name in cpus + gpus]


def pytest_generate_tests(metafunc):
    if "benchmark" in metafunc.fixturenames and "device" in metafunc.fixturenames:
        devices = bench_devices()
        metafunc.parametrize("device", devices, ids=devices)


@pytest.fixture(autouse=True)
def device():
    """Overridden by the parametrization above for benchmark tests."""
    return "CPU:0"


@pytest.fixture(autouse=True)
def _on_device(device):
    with tf.device(device):
        yield


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


def rotate(benchmark, members, rounds, *, warmups=1):
    """Time every callable of ``members`` once per round, in an order that reverses each
    round (so machine drift hits all alike), after ``warmups`` untimed rounds; the
    benchmark records whole rounds.  Returns ``{name: [seconds per round]}``, or None in
    smoke mode (one untimed round)."""
    order = list(members)
    times = {name: [] for name in members}

    def rotation():
        for name in order:
            start = time.perf_counter()
            members[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()

    if benchmark.disabled:
        run(benchmark, rotation)
        return None
    for _ in range(warmups):
        rotation()
    for spent in times.values():
        spent.clear()
    benchmark.pedantic(rotation, rounds=rounds, iterations=1)
    return times
