"""fastewc.testing, the float64 oracle itself: float64_twin on functional graphs holding
non-Layer keras operations and nested backbones, reference_fisher on dict inputs."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from fastewc import testing as ft

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def _assert_float64_twin(model, twin, x):
    assert twin is not model
    assert len(twin.weights) == len(model.weights)
    assert all(v.dtype == "float64" for v in twin.weights if "float" in str(v.dtype))
    assert all(v.dtype == "float64" for v in twin.trainable_variables)
    for layer in _layers(twin):              # nested models and their sublayers included
        if layer.weights and not isinstance(layer, keras.Model):
            assert layer.compute_dtype == "float64", layer.name
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(np.asarray(a, np.float64), b)
    x64 = tf.nest.map_structure(lambda a: a.astype(np.float64) if a.dtype.kind == "f" else a, x)
    want = model(x, training=False).numpy()
    got = twin(x64, training=False)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_twin_with_mask_zero_embedding():
    """Embedding(mask_zero=True) puts a NotEqual operation (no dtype) in the graph."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    h = L.Embedding(30, 8, mask_zero=True)(tokens)
    h = L.LSTM(5)(h)
    model = keras.Model(tokens, L.Dense(3)(h))
    assert any(not isinstance(op, L.Layer) for op in model.operations)
    x = np.random.default_rng(0).integers(0, 30, (4, 6)).astype("int32")
    x[0, 3:] = 0
    _assert_float64_twin(model, ft.float64_twin(model), x)


def test_twin_of_nested_sequential():
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([L.Dense(6, activation="tanh"), L.BatchNormalization()])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(3)(inner(inputs)))
    x = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
    model(x, training=True)                  # moving statistics away from their defaults
    _assert_float64_twin(model, ft.float64_twin(model), x)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_twin_of_bert_backbone_classifier(nested):
    """BertBackbone holds GetItem operations; nested, it is a functional Model subclass
    called as a layer."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=8)
    if nested:
        inputs = {k: keras.Input((8,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
        pooled = backbone(inputs)["pooled_output"]
    else:
        inputs, pooled = backbone.input, backbone.output["pooled_output"]
    model = keras.Model(inputs, L.Dense(3)(pooled))
    rng = np.random.default_rng(2)
    mask = (np.arange(8)[None] < np.array([[8], [5], [3]])).astype("int32")
    x = {"token_ids": rng.integers(1, 50, (3, 8)).astype("int32") * mask, "segment_ids": np.zeros((3, 8), "int32"),
         "padding_mask": mask}
    twin = ft.float64_twin(model)
    _assert_float64_twin(model, twin, x)
    # the attention's own dense layers (built inside TransformerEncoder) are float64 too
    names = [layer.name for layer in _layers(twin) if isinstance(layer, L.EinsumDense)]
    assert names and all(layer.compute_dtype == "float64" for layer in _layers(twin)
                         if isinstance(layer, L.EinsumDense))


def _two_input_models():
    """The same network twice: dict inputs {"a": float (3,), "b": int (2,)} concatenated,
    and one float array (5,) = concat(a, b)."""
    keras.utils.set_random_seed(3)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), dtype="int32", name="b")
    h = L.Concatenate()([a, keras.ops.cast(b, "float32")])   # a Cast operation, not a Layer
    dict_model = keras.Model({"a": a, "b": b}, L.Dense(4)(L.Dense(6, activation="tanh")(h)))
    flat = keras.Input((5,))
    array_model = keras.Model(flat, L.Dense(4)(L.Dense(6, activation="tanh")(flat)))
    array_model.set_weights(dict_model.get_weights())
    rng = np.random.default_rng(3)
    x = {"a": rng.normal(size=(6, 3)).astype("float32"), "b": rng.integers(-2, 3, (6, 2)).astype("int32")}
    return dict_model, array_model, x, rng.integers(0, 4, 6)


def _twin_by_hand(model, build):
    twin = build()
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return twin


@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
def test_reference_fisher_dict_inputs_equal_array_inputs(kind):
    dict_model, array_model, x, y = _two_input_models()
    packed = np.concatenate([x["a"], x["b"].astype("float32")], axis=1)
    kwargs = dict(loss=LOSS, kind=kind, num_samples=3, seed=5, batch_size=4)
    from_dict = ft.reference_fisher_of(dict_model, x, y, **kwargs)
    from_array = ft.reference_fisher_of(array_model, packed, y, **kwargs)
    assert len(from_dict) == len(from_array) == 4
    for got, want in zip(from_dict, from_array):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert max(float(np.abs(f).max()) for f in from_dict) > 0
    if kind == "sampled":
        twin = ft.float64_twin(dict_model)
        labels = ft.reference_sampled_labels(twin, x, loss=LOSS, num_samples=3, seed=5, batch_size=4)
        assert labels.shape == (3, 6)


def test_reference_fisher_rejects_ragged_dict():
    dict_model, _, x, y = _two_input_models()
    x["b"] = x["b"][:5]
    with pytest.raises(ValueError, match="number of examples"):
        ft.reference_fisher(ft.float64_twin(dict_model), x, y, loss=LOSS)
