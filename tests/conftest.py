import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a long test that repeats what a faster one covers (another oracle variant, "
        "a larger model); `make test` skips it, `make test-slow` runs it")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def mlp(d_in=6, hidden=8, classes=5, dtype=None, activation="tanh", out_activation=None):
    return keras.Sequential([
        keras.Input((d_in,)),
        keras.layers.Dense(hidden, activation=activation, dtype=dtype),
        keras.layers.Dense(hidden, activation="relu", use_bias=False, dtype=dtype),
        keras.layers.Dense(classes, activation=out_activation, dtype=dtype),
    ])


def branched(d_in=6, classes=5, dtype=None):
    """Functional model: Dropout and two Dense branches merged."""
    inp = keras.Input((d_in,))
    h = keras.layers.Dense(7, activation="tanh", dtype=dtype)(inp)
    h = keras.layers.Dropout(0.5, dtype=dtype)(h)
    a = keras.layers.Dense(4, activation="sigmoid", dtype=dtype)(h)
    b = keras.layers.Dense(3, activation="relu", dtype=dtype)(h)
    merged = keras.layers.Concatenate(dtype=dtype)([a, b])
    out = keras.layers.Dense(classes, dtype=dtype)(merged)
    return keras.Model(inp, out)


def data(n=13, d_in=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return x, y


def perturb(model, seed, scale=0.3):
    """Stand-in for training on a task: move every weight."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + scale * rng.normal(size=v.shape).astype(np.float32))


def weights64(model):
    return [v.numpy().astype(np.float64) for v in model.trainable_variables]


def assert_close(actual, expected, rtol=1e-5):
    """max |actual − expected| ≤ rtol · max |expected| (float64): relative to the largest
    entry, so entries that are analytically ~0 are judged against the scale of the rest."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)
