"""fastewc.pooling: the mask gradient of non-overlapping max pooling.

Held against TensorFlow's own MaxPoolGrad (bit-identical, ties included) and, inside the
factored Fisher, against the float64 per-example reference.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import pooling
from fastewc.testing import float64_twin, reference_fisher

L = keras.layers
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gradients(call, x, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = call(x)
    return y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()


@pytest.mark.parametrize("layer_cls,shape,pool", [
    (L.MaxPooling1D, (3, 9, 4), 2),                # odd length: the last row is never read
    (L.MaxPooling1D, (2, 12, 3), 3),
    (L.MaxPooling2D, (3, 8, 8, 5), 2),
    (L.MaxPooling2D, (2, 7, 9, 3), (2, 3)),        # cropped in both dims
])
def test_mask_gradient_equals_tensorflow_with_ties(layer_cls, shape, pool):
    layer = layer_cls(pool)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=shape).astype(np.float32)      # many tied maxima
    layer.build(shape)
    dy_shape = layer.compute_output_shape(shape)
    dy = tf.constant(rng.normal(size=dy_shape).astype(np.float32))
    masked = pooling.masked_max_pool_call(layer, lambda: True)
    assert masked is not None
    want_y, want_dx = gradients(layer, x, dy)
    got_y, got_dx = gradients(masked, x, dy)
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_dx, want_dx)
    # use_mask() false: TensorFlow's own gradient, same numbers
    _, native_dx = gradients(pooling.masked_max_pool_call(layer, lambda: False), x, dy)
    np.testing.assert_array_equal(native_dx, want_dx)


class OwnCall(L.MaxPooling2D):
    def call(self, inputs):
        return super().call(inputs) * 2.0


@pytest.mark.parametrize("layer", [
    L.MaxPooling2D(3, strides=2),                                 # overlapping windows
    L.MaxPooling2D(2, padding="same"),
    L.MaxPooling2D(2, data_format="channels_first"),
    L.AveragePooling2D(2),
    L.MaxPooling3D(2),                         # TF's 3-D gradient routes to every tie
    OwnCall(2),                                                   # a subclass's own call
], ids=["overlap", "same", "channels_first", "average", "3d", "subclass"])
def test_layers_not_covered_keep_their_call(layer):
    assert pooling.masked_max_pool_call(layer, lambda: True) is None


def test_exact_fisher_through_max_pool_matches_reference(monkeypatch):
    """10 classes: K = 9 cotangents, so the mask route is taken (counted)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((9, 9, 2)),
        L.Conv2D(4, 3, activation="relu"),
        L.MaxPooling2D(2),                     # 7 x 7 -> 3 x 3, one row and column cropped
        L.Flatten(),
        L.Dense(10),
    ])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 10, size=5)
    built = []
    original = pooling._first_max_mask
    monkeypatch.setattr(pooling, "_first_max_mask",
                        lambda *args: built.append(1) or original(*args))
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="factored",
                                  batch_size=5, jit_compile=False)
    assert built, "the mask route was not used"
    want = reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="exact")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-9)
