"""The memory budget that sizes a plan's rows (fastewc._memory) and batch_size=None."""
import keras
import numpy as np

import fastewc
from fastewc import _memory
from fastewc.blocks.diagonal import Diagonal


def test_rows_within_budget():
    per_row = 1000
    budget = 64 * _memory.PEAK_PER_BYTE * per_row
    assert _memory.rows_within(budget, per_row, 4096) == 64
    assert _memory.rows_within(budget + 1, per_row, 4096) == 64         # a power of two
    assert _memory.rows_within(100 * _memory.PEAK_PER_BYTE * per_row, per_row, 4096) == 64
    assert _memory.rows_within(budget, per_row, 100) == 64
    assert _memory.rows_within(budget, per_row, 50) == 50               # the cap, unrounded
    assert _memory.rows_within(10, per_row, 4096) == 1                  # never 0


def _factored_rows(batch_size, k, probe_floats, budget=2**40, sums=3_470_872):
    from types import SimpleNamespace
    from fastewc.engines import factored
    engine = factored.FactoredEngine.__new__(factored.FactoredEngine)
    engine.blocks = SimpleNamespace(amortized_floats=0, shapes=[(sums,)], blocks=[Diagonal])    # a diagonal plan
    return engine.rows_per_call(batch_size, k, probe_floats, budget)


def test_factored_rows_floor_is_bounded_by_the_deltas_of_a_call():
    """The 16-row floor holds at most max(2²⁶, S) delta floats (K · probe floats per row;
    S the floats of the sums), by hand: rows = max(min(16, 2^⌊log₂(max(2²⁶, S)/f)⌋),
    2^⌊log₂(2²⁴/f)⌋) for f = K · probe floats, at most 4096, within the budget and
    ``batch_size``.  The probe floats and S are the plans' (bench_large at 224 px,
    bench_models at 32 px, K = 9 for exact; S = the parameters for a diagonal plan)."""
    assert _factored_rows(None, 1, 13_357_224) == 4       # MobileNetV2 224 px: 2²⁶/f = 5.0
    assert _factored_rows(None, 1, 21_175_272, sums=25_583_592) == 2    # ResNet50 224 px: 3.2
    assert _factored_rows(None, 1, 20_274_664, sums=86_567_656) == 4    # ViT-B/16: S/f = 4.3
    assert _factored_rows(None, 1, 20_274_664, sums=60_000_000) == 2    # S < 2²⁶: 3.3
    assert _factored_rows(None, 1, 70_000_000) == 1       # 0.96: never 0
    assert _factored_rows(None, 9, 460_554) == 16         # DenseNet121 32 px exact: 16.2, the floor
    assert _factored_rows(None, 9, 272_586) == 16         # MobileNetV2 32 px exact: 27.4 (2²⁴/f = 6.8)
    assert _factored_rows(None, 1, 432_138) == 32         # ResNet50 32 px: 2²⁴/f = 38.8, the cache bound
    assert _factored_rows(None, 10, 420_000) == 8         # 2²⁶/f = 15.98
    # K · probe floats > 2²⁶: the K passes loop (FactoredEngine.loops_cotangents), a row
    # counts ONE cotangent's deltas: GPT-2 base exact, S/f = 11.7 (the K passes at once: 1 row)
    assert _factored_rows(None, 9, 10_600_000, sums=124_447_498) == 8
    assert _factored_rows(None, 1, 1000) == 4096          # MAX_ROWS
    assert _factored_rows(2, 1, 13_357_224) == 2          # batch_size caps
    assert _factored_rows(None, 1, 13_357_224, budget=2 * 2 * 4 * 13_357_224) == 2    # the budget caps


def test_budget_is_a_fraction_of_the_device_and_does_not_move():
    assert _memory.device_bytes() > 0
    assert _memory.budget_bytes() == int(_memory.device_bytes() * _memory.BUDGET_FRACTION)
    assert _memory.budget_bytes() == _memory.budget_bytes()


def test_default_batch_size_takes_every_example_in_one_call_when_it_fits():
    """batch_size=None: a small model's 512 examples are one compiled call; an explicit
    batch_size caps the rows."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    x = np.random.default_rng(0).normal(size=(512, 6)).astype(np.float32)
    y = np.arange(512) % 3
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    default = fastewc.FisherEstimator(model, loss=loss, kind="exact", method="factored")
    assert default.batch_size is None
    assert default.plan((x, y)).rows >= 512
    capped = fastewc.FisherEstimator(model, loss=loss, kind="exact", method="factored", batch_size=100)
    assert capped.plan((x, y)).rows == 100
    for a, b in zip(default((x, y)), capped((x, y))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=0)


ALLOCATOR_SCRIPT = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)                  # ctypes only: no other thread in this process
libc = ctypes.CDLL(None)
libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

mib, count = 2**20, 256
libc.free(libc.malloc(16 * mib))                 # mmapped, freed: the threshold becomes 16 MiB
blocks = [libc.malloc(mib) for _ in range(count)]
for block in blocks:
    ctypes.memset(block, 1, mib)                 # resident
for block in blocks[:-1]:
    libc.free(block)                             # freed below the last: kept by glibc
kept = resident()
trimmed = allocator.release_free_memory()
print(json.dumps({"trimmed": trimmed, "released": kept - resident()}))
"""


def test_free_memory_the_allocator_kept_goes_back_and_consolidate_returns_it(monkeypatch):
    """glibc keeps freed blocks below its mmap threshold (raised by freeing a larger mmapped
    block) resident; release_free_memory returns them (the kernel's resident set drops by
    what was freed), and consolidate calls it once, after the Fisher.  The allocator part
    runs in a fresh process that loads only ``fastewc/_allocator.py``: in a test process
    other threads' allocations could reuse the freed blocks before the reading."""
    import ctypes
    import json
    import subprocess
    import sys
    import pytest
    from fastewc import _allocator
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.malloc, libc.free  # noqa: B018 -- glibc only
    except (OSError, AttributeError, TypeError):
        pytest.skip("not glibc")
    proc = subprocess.run([sys.executable, "-c", ALLOCATOR_SCRIPT, _allocator.__file__],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mib, count = 2**20, 256
    assert result["trimmed"] is True
    assert result["released"] >= (count - 1) * mib * 0.9, (
        f"released {result['released'] / mib:.0f} MiB of {count - 1} freed")

    calls = []
    monkeypatch.setattr(_allocator, "release_free_memory", lambda: calls.append(1))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    fastewc.EWC(model, lam=1.0).consolidate((np.ones((2, 3), np.float32), np.array([0, 1])),
                                            loss="sparse_categorical_crossentropy", kind="empirical")
    assert calls == [1]
