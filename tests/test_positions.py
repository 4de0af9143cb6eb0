"""Per-position likelihoods (issue 23): outputs (batch, positions..., classes) with masks.

Each kind and engine against the float64 per-example oracle (fastewc.testing), which
writes the example's log-likelihood out as the masked sum over its positions; the exact
kind's per-position expectation against the brute-force expectation over every joint
labeling of the positions."""
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import testing as ft

L = keras.layers
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
V, T = 5, 4                     # vocabulary, positions


def causal_lm():
    """Embedding -> causal Conv1D -> Dense(vocab), dict input with a padding mask."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((T,), dtype="int32", name="token_ids")
    padding = keras.Input((T,), dtype="int32", name="padding_mask")
    h = L.Embedding(V, 4)(tokens)
    h = h * keras.ops.cast(padding, "float32")[..., None]
    h = L.Conv1D(6, 2, padding="causal", activation="tanh")(h)
    return keras.Model({"token_ids": tokens, "padding_mask": padding}, L.Dense(V)(h))


def lm_data(n=5):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, V, (n, T + 1))
    lengths = np.array([T + 1, 3, 2, T + 1, 4][:n])
    mask = np.arange(T + 1)[None] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    x = {"token_ids": ids[:, :-1].astype("int32"), "padding_mask": mask[:, 1:].astype("int32")}
    return x, ids[:, 1:].astype("int32")


def tagger():
    """Embedding(mask_zero=True) -> LSTM(return_sequences) -> Dense: a Keras mask."""
    keras.utils.set_random_seed(2)
    tokens = keras.Input((T,), dtype="int32")
    h = L.Embedding(8, 4, mask_zero=True)(tokens)
    h = L.LSTM(3, return_sequences=True)(h)
    return keras.Model(tokens, L.Dense(3)(h))


def tagger_data():
    x = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 1, 2]], "int32")
    y = np.random.default_rng(3).integers(0, 3, (3, T))
    return x, y


def segmenter():
    keras.utils.set_random_seed(4)
    images = keras.Input((3, 3, 2))
    h = L.Conv2D(4, 2, padding="same", activation="relu")(images)
    return keras.Model(images, L.Conv2D(3, 1)(h))


def seg_data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(3, 3, 3, 2)).astype("float32"), rng.integers(0, 3, (3, 3, 3))


def assert_matches(got, want, rtol=1e-4):
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(np.abs(w).max(), 1e-30))


PROBLEMS = {"causal_lm": (causal_lm, lm_data), "tagger": (tagger, tagger_data),
            "segmenter": (segmenter, seg_data)}
METHODS = {"causal_lm": ("factored", "vmap", "loop"), "tagger": ("factored", "loop"),
           "segmenter": ("factored", "vmap", "loop")}


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_each_kind_against_the_oracle(problem, kind):
    make_model, make_data = PROBLEMS[problem]
    model = make_model()
    x, y = make_data()
    want = ft.reference_fisher_of(model, x, y, loss=LOGITS, kind=kind, num_samples=2, seed=7)
    for method in METHODS[problem]:
        got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind=kind, method=method,
                                      num_samples=2, seed=7)
        assert_matches(got, want)
