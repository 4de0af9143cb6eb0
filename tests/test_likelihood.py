"""The likelihood families (fastewc.likelihood) against closed forms in float64 NumPy.

The output-space Fisher of one example is M = Σ_k W_k U_k U_kᵀ; every family's exact
cotangents must reproduce its full expectation E_y[u(y) u(y)ᵀ]:

| family                | logits                 | probabilities (Σ p = 1)  |
|-----------------------|------------------------|--------------------------|
| categorical           | diag(p) − p pᵀ         | diag(1/p) − 1 1ᵀ         |
| Bernoulli (per unit)  | diag(p (1 − p))        | diag(1 / (p (1 − p)))    |
| Gaussian (unit var.)  | I                      |                          |
"""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from fastewc import likelihood as lib

N, D = 3, 4
RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(N, D)).astype(np.float32)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def output_fisher(u, w):
    """(N, D, D): Σ_k w_kn u_kn u_knᵀ in float64."""
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    return np.einsum("kn,kni,knj->nij", w, u, u)


CASES = {   # loss -> (model output, expected output-space Fisher per example)
    "sparse_logits": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), LOGITS,
                      lambda: [np.diag(p) - np.outer(p, p) for p in softmax(LOGITS.astype(np.float64))]),
    "onehot_logits": (keras.losses.CategoricalCrossentropy(from_logits=True), LOGITS,
                      lambda: [np.diag(p) - np.outer(p, p) for p in softmax(LOGITS.astype(np.float64))]),
    "sparse_probs": ("sparse_categorical_crossentropy", softmax(LOGITS),
                     lambda: [np.diag(1 / p) - 1.0 for p in softmax(LOGITS).astype(np.float64)]),
    "bernoulli_logits": (keras.losses.BinaryCrossentropy(from_logits=True), LOGITS,
                         lambda: [np.diag(p * (1 - p)) for p in sigmoid(LOGITS.astype(np.float64))]),
    "bernoulli_probs": ("binary_crossentropy", sigmoid(LOGITS),
                        lambda: [np.diag(1 / (p * (1 - p))) for p in sigmoid(LOGITS).astype(np.float64)]),
    "gaussian": ("mse", LOGITS, lambda: [np.eye(D)] * N),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_cotangents_give_the_full_expectation(case):
    loss, out, want = CASES[case]
    lik = lib.resolve_loss(loss)
    u, w = lik.cotangents(tf.constant(out), None, "exact")
    k = lik.num_cotangents("exact", 1, (D,))
    assert u.shape == (k, N, D) and w.shape == (k, N)                     # sizes before values
    np.testing.assert_allclose(output_fisher(u, w), np.stack(want()), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("loss,k", [(keras.losses.SparseCategoricalCrossentropy(from_logits=True), D - 1),
                                    ("categorical_crossentropy", D),
                                    (keras.losses.BinaryCrossentropy(from_logits=True), D),
                                    ("binary_crossentropy", 2 * D), ("mse", D)])
def test_exact_count_drops_the_score_direction_for_logits_only(loss, k):
    assert lib.resolve_loss(loss).num_cotangents("exact", 5, (D,)) == k
    assert lib.resolve_loss(loss).num_cotangents("sampled", 5, (D,)) == 5
    assert lib.resolve_loss(loss).num_cotangents("empirical", 5, (D,)) == 1


def test_empirical_and_sampled_categorical_scores():
    lik = lib.resolve_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.array([0, 3, 1])
    p = softmax(LOGITS.astype(np.float64))
    u, w = lik.cotangents(tf.constant(LOGITS), tf.constant(y), "empirical")
    np.testing.assert_allclose(u.numpy()[0], p - np.eye(D)[y], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(w.numpy(), np.ones((1, N)))
    noise = lik.noise(tf.constant([7, 2]), 2, [N, D])
    u, w = lik.cotangents(tf.constant(LOGITS), None, "sampled", noise)
    drawn = np.minimum((np.cumsum(p, -1)[None] < noise.numpy()[..., None]).sum(-1), D - 1)   # inverse CDF
    np.testing.assert_allclose(u.numpy(), p[None] - np.eye(D)[drawn], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(w.numpy(), np.full((2, N), 0.5))


@pytest.mark.parametrize("loss,op,shape", [
    ("sparse_categorical_crossentropy", tf.random.stateless_uniform, [2, N]),
    ("binary_crossentropy", tf.random.stateless_uniform, [2, N, D]),
    ("mse", tf.random.stateless_normal, [2, N, D]),
])
def test_noise_is_the_documented_stateless_draw(loss, op, shape):
    seed = tf.constant([11, 3], tf.int32)
    got = lib.resolve_loss(loss).noise(seed, 2, [N, D])
    np.testing.assert_array_equal(got.numpy(), op(shape, seed=seed, alg="philox").numpy())


def test_families_are_immutable_hashable_values():
    names = ["sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mse"]
    liks = [lib.resolve_loss(n) for n in names]
    assert [type(x) for x in liks] == [lib.Categorical, lib.Categorical, lib.Bernoulli, lib.Gaussian]
    assert [x.family for x in liks] == ["categorical", "categorical", "binary", "gaussian"]
    assert len({x.key for x in liks}) == len(set(liks)) == 4
    assert lib.resolve_loss(keras.losses.mean_squared_error) == lib.resolve_loss("MSE") == lib.Gaussian()
    logits = lib.resolve_loss(keras.losses.BinaryCrossentropy(from_logits=True))
    assert logits.from_logits and logits != liks[2] and hash(logits) == hash(lib.Bernoulli(from_logits=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        liks[0].sparse = False


def test_output_shaped_labels_get_the_trailing_unit():
    y = lib.resolve_loss("binary_crossentropy").check_labels(np.array([0, 1, 1]), 1, out_tail=[1])
    assert y.shape == (3, 1) and y.dtype == np.float32
    with pytest.raises(ValueError, match=r"labels \(y\) for this loss must have the model output's shape "
                                         r"\(batch, 2\). Received: labels of shape \(batch, 3\)"):
        lib.resolve_loss("mse").check_labels(np.zeros((3, 3)), 2, out_tail=[2])
