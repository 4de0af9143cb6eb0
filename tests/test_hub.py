"""Factored Fisher rules for keras_hub layers (fastewc.rules.hub) against the float64 oracle.

Classifiers on tiny random BertBackbone / GPT2Backbone models (no download), dict inputs;
then keras' ReversibleEmbedding in reverse mode and keras_hub's PositionEmbedding alone.
"""
import warnings

import keras
import numpy as np
import pytest

import fastewc
from fastewc import capture as capture_lib
from fastewc import testing as ft

keras_hub = pytest.importorskip("keras_hub")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N, T, CLASSES = 7, 10, 5
TINY = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
            max_sequence_length=32)
KEYS = {"bert": ("token_ids", "segment_ids", "padding_mask"), "gpt2": ("token_ids", "padding_mask")}


def _classifier(which):
    """The backbone nested as a layer (its float64 twin: fastewc.testing.float64_twin)."""
    backbone_class = keras_hub.models.BertBackbone if which == "bert" else keras_hub.models.GPT2Backbone
    backbone = backbone_class(**TINY)
    inputs = {k: keras.Input((T,), dtype="int32", name=k) for k in KEYS[which]}
    if which == "bert":
        features = backbone(inputs)["pooled_output"]
    else:
        features = keras.layers.GlobalAveragePooling1D()(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(features))


def _data(which, seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, TINY["vocabulary_size"], (N, T)).astype("int32"),
         "padding_mask": (np.arange(T)[None] < rng.integers(4, T + 1, (N, 1))).astype("int32")}
    x["token_ids"][0, :3] = 7                         # an id repeated within one example
    if which == "bert":
        x["segment_ids"] = (np.arange(T)[None] >= rng.integers(2, T, (N, 1))).astype("int32")
    return x, rng.integers(0, CLASSES, N)


@pytest.fixture(scope="module")
def hub_models():
    """which -> (float32 model, x, y, {kind: float64 reference})."""
    out = {}
    for i, which in enumerate(("bert", "gpt2")):
        keras.utils.set_random_seed(10 + i)
        model = _classifier(which)
        x, y = _data(which, seed=i)
        refs = {kind: ft.reference_fisher_of(model, x, y, loss=LOSS, kind=kind) for kind in ("empirical", "exact")}
        out[which] = (model, x, y, refs)
    return out


def _assert_matches(model, fisher, ref):
    """~1e-4 of each variable's largest entry; a variable whose Fisher is analytically zero
    (attention key bias: softmax ignores a constant shift of the keys) to 1e-7 of the
    largest entry of the model."""
    top = max(float(np.abs(r).max()) for r in ref)
    assert top > 0
    for var, got, want in zip(model.trainable_variables, fisher, ref):
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, var.path
        assert np.all(np.isfinite(got)), var.path
        scale = float(np.abs(want).max())
        if scale > 1e-7 * top:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=var.path)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * top, err_msg=var.path)


@pytest.mark.parametrize("which,kind,jit_compile", [
    ("bert", "empirical", False), pytest.param("bert", "exact", True, marks=pytest.mark.slow),
    pytest.param("gpt2", "empirical", True, marks=pytest.mark.slow), ("gpt2", "exact", False)],
    ids=["bert-empirical-eager", "bert-exact-xla", "gpt2-empirical-xla", "gpt2-exact-eager"])
def test_backbone_classifier_factored_matches_float64(hub_models, which, kind, jit_compile):
    model, x, y, refs = hub_models[which]
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind=kind, method="factored",
                                     jit_compile=jit_compile)
    _assert_matches(model, fisher, refs[kind])


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_backbone_auto_plans_factored_without_warning(hub_models, which):
    model, x, y, _ = hub_models[which]
    assert capture_lib.layers_without_rule(model, fastewc.default_rules()) == []
    # The backbones keep their dropout layers (rate 0.1): inference mode makes them the identity.
    nested = model._flatten_layers(include_self=False, recursive=True)
    assert any(isinstance(layer, keras.layers.Dropout) and layer.rate > 0 for layer in nested)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = fastewc.FisherEstimator(model, loss=LOSS, method="auto").plan((x, y))
    assert plan.method == "factored"


# -- ReversibleEmbedding -------------------------------------------------------------------
V, D, S = 9, 6, 5


def _reverse_model(tie_weights, soft_cap, rank, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D,) if rank == 2 else (S, D))
    layer = keras_hub.layers.ReversibleEmbedding(V, D, tie_weights=tie_weights, logit_soft_cap=soft_cap,
                                                 embeddings_initializer="normal")
    layer.build((None,))
    if not tie_weights:
        layer.reverse_embeddings.assign(np.random.default_rng(seed).normal(size=(D, V)))
    logits = layer(inputs, reverse=True)
    if rank == 3:
        logits = keras.layers.GlobalAveragePooling1D()(logits)
    return keras.Model(inputs, logits)


@pytest.mark.parametrize("tie_weights,soft_cap,rank,jit_compile", [
    (True, None, 2, False), (False, None, 2, True), (True, 3.0, 3, True), (False, 2.0, 3, False)])
def test_reversible_embedding_reverse_only(tie_weights, soft_cap, rank, jit_compile):
    model = _reverse_model(tie_weights, soft_cap, rank, seed=3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, D) if rank == 2 else (N, S, D)).astype("float32")
    y = rng.integers(0, V, N)
    ref = ft.reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="factored",
                                     jit_compile=jit_compile)
    _assert_matches(model, fisher, ref)
    if not tie_weights:     # the lookup table is not read in reverse mode
        np.testing.assert_array_equal(np.asarray(fisher[0]), 0.0)


def _lookup_ids(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (N, S)).astype("int32")
    ids[0, :3] = 4          # repeated within one example
    ids[1, -2:] = 0         # padding (mask_zero)
    return ids


def test_reversible_embedding_forward_mask_zero_untied():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((S,), dtype="int32")
    hidden = keras.layers.ReversibleEmbedding(V, D, tie_weights=False, mask_zero=True,
                                              embeddings_initializer="normal")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(hidden)))
    x, y = _lookup_ids(6), np.random.default_rng(6).integers(0, 4, N)
    ref = ft.reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="factored")
    _assert_matches(model, fisher, ref)


def test_reversible_embedding_both_ways_is_factored():
    """Called both ways (a tied LM head) it is one merged record, not a shared-layer fallback;
    its values against the oracle: tests/test_hub_causal_lm.py."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((S,), dtype="int32")
    layer = keras_hub.layers.ReversibleEmbedding(V, D, embeddings_initializer="normal")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(layer(layer(inputs), reverse=True)))
    x, y = _lookup_ids(8), np.random.default_rng(8).integers(0, V, N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = fastewc.FisherEstimator(model, loss=LOSS, method="auto").plan((x, y))
    assert plan.method == "factored"


def test_reversible_embedding_ids_outside_table_are_reported():
    """IdGuard wraps the rule's call: ids outside the table are counted, not crashed on."""
    keras.utils.set_random_seed(9)
    inputs = keras.Input((S,), dtype="int32")
    hidden = keras_hub.layers.ReversibleEmbedding(V, D, name="tokens")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(hidden)))
    x = _lookup_ids(10)
    x[2, 1] = V + 3
    with pytest.raises(ValueError, match="tokens"):
        fastewc.fisher_diagonal(model, (x, np.zeros(N, "int64")), loss=LOSS, method="factored")


# -- PositionEmbedding ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ["start_index", "rank4", "positions"])
def test_position_embedding(case):
    keras.utils.set_random_seed(11)
    shape = (3, S, D) if case == "rank4" else (S, D)
    inputs = keras.Input(shape)
    layer = keras_hub.layers.PositionEmbedding(sequence_length=12)
    if case == "start_index":
        pos = layer(inputs, start_index=4)
    elif case == "positions":
        pos = layer(inputs, positions=np.array([0, 3, 3, 1, 11], "int32"))   # a repeated row
    else:
        pos = layer(inputs)
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Add()([inputs, pos]))
    pooled = keras.layers.Flatten()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(N,) + shape).astype("float32"), rng.integers(0, 3, N)
    ref = ft.reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="factored")
    _assert_matches(model, fisher, ref)


# -- ViTPatchingAndEmbedding ---------------------------------------------------------------
VIT = dict(image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)


def _vit_classifier(seed, dtype=None):
    """A tiny ViTBackbone with Dense(CLASSES) on the class token (as ViTImageClassifier)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(**VIT, dtype=dtype)
    return keras.Model(backbone.input, keras.layers.Dense(CLASSES, dtype=dtype)(backbone.output[:, 0, :]))


def _vit_twin(model):
    """The float64 twin built from the configuration (ViTPatchingAndEmbedding's config does
    not round-trip, so fastewc.testing.float64_twin cannot clone it), same weights."""
    twin = _vit_classifier(seed=0, dtype="float64")
    twin.set_weights([w.astype("float64") for w in model.get_weights()])
    return twin


@pytest.mark.parametrize("kind,jit_compile", [("exact", False), ("empirical", True)])
def test_vit_patching_and_embedding_factored(kind, jit_compile):
    model = _vit_classifier(seed=21)
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(N,) + VIT["image_shape"]).astype("float32"), rng.integers(0, CLASSES, N)
    assert capture_lib.layers_without_rule(model, fastewc.default_rules()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # auto takes the whole ViT factored, silently
        estimator = fastewc.FisherEstimator(model, loss=LOSS, kind=kind, jit_compile=jit_compile)
        assert estimator.plan((x, y)).method == "factored"
        fisher = estimator((x, y))
    _assert_matches(model, fisher, ft.reference_fisher(_vit_twin(model), x.astype("float64"), y, loss=LOSS, kind=kind))
