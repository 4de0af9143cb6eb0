"""fastewc.kfac_fisher against float64 references: the factors against a per-example loop
that reads the input rows off a Jacobian (fastewc.testing.reference_kronecker_factors),
the single-example single-position case against the exact Fisher block, and the layers
without a Kronecker form against the diagonal reference."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import testing

from conftest import assert_close

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _cnn():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((7, 7, 2)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(4, 2, use_bias=False, activation="tanh"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(3),
    ])


def _sequence_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((5, 4)),
        keras.layers.Conv1D(3, 2, padding="causal", dilation_rate=2),
        keras.layers.Dense(4, activation="relu"),          # a Dense over positions
        keras.layers.LayerNormalization(),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])


def _check_factors(model, x, y, loss, kind, **kwargs):
    result = fastewc.kfac_fisher(model, (x, y), loss=loss, kind=kind, **kwargs)
    labels = None
    twin = testing.float64_twin(model)
    if kind == "sampled":
        labels = testing.reference_sampled_labels(twin, x, loss=loss, num_samples=kwargs["num_samples"],
                                                  seed=kwargs["seed"], batch_size=kwargs.get("batch_size"))
    reference = testing.reference_kronecker_factors(twin, x, y, loss=loss, kind=kind, sampled_labels=labels)
    assert sorted(b.layer for b in result.blocks) == sorted(reference)
    for block in result.blocks:
        a, g = reference[block.layer]
        assert block.a.dtype == tf.float32 and block.g.dtype == tf.float32
        assert_close(block.a, a)
        assert_close(block.g, g)
    return result, twin


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_cnn_factors_match_float64(kind):
    rng = np.random.default_rng(0)
    model = _cnn()
    x = rng.normal(size=(6, 7, 7, 2)).astype("float32")
    model.layers[2].moving_mean.assign(rng.normal(size=4).astype("float32"))
    y = rng.integers(0, 3, 6)
    result, twin = _check_factors(model, x, y, LOGITS, kind, batch_size=4)   # 6 = 4 + 2 padded rows
    # The BatchNormalization has no Kronecker form: its diagonal is the diagonal Fisher's.
    diagonal = testing.reference_fisher(twin, x, y, loss=LOGITS, kind=kind)
    for variable, mine, ref in zip(model.trainable_variables, result.diagonal, diagonal):
        if "batch_normalization" in variable.path:
            assert_close(mine, ref)
        else:
            assert mine is None


def test_sequence_factors_match_float64_mse():
    rng = np.random.default_rng(3)
    model = _sequence_model()
    x = rng.normal(size=(5, 5, 4)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    for kind in ("empirical", "exact"):
        _check_factors(model, x, y, "mse", kind)


def test_sampled_factors_match_float64():
    rng = np.random.default_rng(4)
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(4, activation="softmax")])
    x = rng.normal(size=(9, 6)).astype("float32")
    _check_factors(model, x, np.zeros(9, int), "sparse_categorical_crossentropy", "sampled",
                   num_samples=3, seed=7)


def test_one_example_one_position_is_the_exact_fisher_block():
    """For one example at one position A ⊗ G equals E_y[vec(ḡ) vec(ḡ)ᵀ] exactly (the
    per-example gradient ḡ = ā δᵀ is rank one): checked against the float64 outer
    products of the per-example gradients of kernel and bias, stacked as W̄ (bias last)."""
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                              keras.layers.Dense(3)])
    x = rng.normal(size=(1, 4)).astype("float32")
    result = fastewc.kfac_fisher(model, (x, np.array([1])), loss=LOGITS, kind="exact")
    twin = testing.float64_twin(model)
    logits = twin(x.astype(np.float64))
    p = tf.nn.softmax(logits)[0].numpy()
    for block in result.blocks:
        layer = next(layer for layer in twin.layers if layer.name == block.layer)
        fisher = 0.0
        for c in range(3):
            with tf.GradientTape() as tape:
                target = -tf.nn.log_softmax(twin(x.astype(np.float64)))[0, c]
            g_kernel, g_bias = tape.gradient(target, [layer.kernel, layer.bias])
            g = np.concatenate([g_kernel.numpy(), g_bias.numpy()[None]], 0).reshape(-1)
            fisher = fisher + p[c] * np.outer(g, g)
        assert_close(np.kron(block.a.numpy(), block.g.numpy()), fisher)


def test_full_diagonal_of_a_bias_is_the_diagonal_fisher():
    """diag(A ⊗ G) at the bias row is A[d, d] · diag(G) = 1 · E[δ²]: the bias's exact
    diagonal Fisher, for one example or many."""
    rng = np.random.default_rng(6)
    model = _cnn()
    x = rng.normal(size=(5, 7, 7, 2)).astype("float32")
    y = rng.integers(0, 3, 5)
    result = fastewc.kfac_fisher(model, (x, y), loss=LOGITS, kind="exact")
    reference = testing.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact")
    full = result.full_diagonal()
    for variable, mine, ref in zip(model.trainable_variables, full, reference):
        assert tuple(mine.shape) == tuple(variable.shape)
        if variable.path.endswith("dense_1/bias") or "batch_normalization" in variable.path:
            assert_close(mine, ref)


def test_a_second_call_does_not_retrace():
    rng = np.random.default_rng(7)
    model = _sequence_model()
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    estimator = fastewc.FisherEstimator(model, loss="mse", kind="exact", curvature="kfac")
    estimator((x, y))
    traces = estimator.tracing_count()
    second = estimator((x[::-1].copy(), y[::-1].copy()))
    assert estimator.tracing_count() == traces
    assert isinstance(second, fastewc.KroneckerFisher)


def test_kfac_needs_the_factored_engine():
    model = _sequence_model()
    with pytest.raises(ValueError, match=r"`method` must be 'auto' or 'factored' with curvature='kfac'"):
        fastewc.FisherEstimator(model, loss="mse", curvature="kfac", method="vmap")
    with pytest.raises(ValueError, match=r"`curvature` must be one of 'diagonal', 'kfac'"):
        fastewc.FisherEstimator(model, loss="mse", curvature="full")


def test_a_layer_without_rule_is_named():
    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    model = keras.Sequential([keras.Input((3,)), Scale(name="my_scale"), keras.layers.Dense(2)])
    x = np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match=r"curvature='kfac' needs a factored Fisher rule.*'my_scale' \(Scale\)"):
        fastewc.kfac_fisher(model, (x, np.zeros(2, int)), loss=LOGITS)


def test_factors_too_large_for_the_device_raise_before_any_pass(monkeypatch):
    from fastewc import _memory
    model = _cnn()
    x = np.zeros((2, 7, 7, 2), "float32")
    monkeypatch.setattr(_memory, "device_bytes", lambda: 2**12)      # 4 KiB of "memory"
    with pytest.raises(ValueError, match=r"needs about .* GiB for its Kronecker factors.*layer 'dense(_[0-9]+)?' alone "
                                         r"has an A of shape \(37, 37\)"):
        fastewc.kfac_fisher(model, (x, np.zeros(2, int)), loss=LOGITS)
