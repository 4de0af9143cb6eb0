"""The memory budget that sizes a plan's rows (fastewc._memory) and batch_size=None."""
import keras
import numpy as np

import fastewc
from fastewc import _memory


def test_rows_within_budget():
    per_row = 1000
    budget = 64 * _memory.PEAK_PER_BYTE * per_row
    assert _memory.rows_within(budget, per_row, 4096) == 64
    assert _memory.rows_within(budget + 1, per_row, 4096) == 64         # a power of two
    assert _memory.rows_within(100 * _memory.PEAK_PER_BYTE * per_row, per_row, 4096) == 64
    assert _memory.rows_within(budget, per_row, 100) == 64
    assert _memory.rows_within(budget, per_row, 50) == 50               # the cap, unrounded
    assert _memory.rows_within(10, per_row, 4096) == 1                  # never 0


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
