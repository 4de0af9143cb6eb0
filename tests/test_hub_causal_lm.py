"""keras_hub CausalLM task models as they come (GPT2CausalLM, GemmaCausalLM, MistralCausalLM:
tiny configs, random weights, ``preprocessor=None``, dict inputs with a padding mask): the
per-token Fisher, factored with no fallback, against the float64 oracle; EWC, make_train_step
and EWCModel on them.  The tied input/output embedding (ReversibleEmbedding called both ways)
and keras_hub's RMS norms have their own tests below.
"""
import warnings

import keras
import numpy as np
import pytest

import fastewc
from fastewc import testing as ft
from fastewc.ewc import _relative_path
from fastewc.rules import hub as hub_rules

keras_hub = pytest.importorskip("keras_hub")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N, T, V = 3, 6, 24
LENGTHS = [6, 4, 5]          # padding at the end of two examples


def _gpt2():
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _gemma():
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=V, num_layers=2, num_query_heads=2,
                                              num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
                                              head_dim=4)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _mistral():
    # Untied: ReversibleEmbedding(tie_weights=False) still called both ways, on two tables.
    backbone = keras_hub.models.MistralBackbone(vocabulary_size=V, num_layers=2, num_query_heads=2,
                                                num_key_value_heads=1, hidden_dim=8, intermediate_dim=16)
    return keras_hub.models.MistralCausalLM(backbone=backbone, preprocessor=None)


BUILDERS = {"gpt2": _gpt2, "gemma": _gemma, "mistral": _mistral}


def lm_data(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (N, T + 1)).astype("int32")
    ids[0, :3] = 7                                   # an id repeated within one example
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:]


@pytest.fixture(scope="module")
def lms():
    """which -> CausalLM with random weights (Gemma's norm scales start at zero: randomized)."""
    out = {}
    for i, (which, build) in enumerate(BUILDERS.items()):
        keras.utils.set_random_seed(20 + i)
        lm = build()
        rng = np.random.default_rng(i)
        for v in lm.trainable_variables:
            v.assign(0.5 * rng.normal(size=v.shape))
        out[which] = lm
    return out


def last_token(lm):
    """The LM's logits at the last position, (batch, vocab): every layer, both table uses."""
    return keras.Model(lm.inputs, lm.outputs[0][:, -1, :])


def assert_matches(variables, fisher, ref):
    """~1e-4 of each variable's largest entry (analytically-zero ones: 1e-7 of the model's)."""
    top = max(float(np.abs(r).max()) for r in ref)
    assert top > 0
    for var, got, want in zip(variables, fisher, ref):
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, var.path
        scale = max(float(np.abs(want).max()), 1e-3 * top)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=var.path)


def factored_without_warning(model, data, **kwargs):
    """The Fisher with method='auto'; asserts the plan is factored and nothing warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator = fastewc.FisherEstimator(model, loss=LOSS, method="auto", **kwargs)
        fisher = estimator(data, seed=0)
        assert estimator.plan(data).method == "factored"
    return fisher


@pytest.mark.parametrize("which,kind", [("gpt2", "empirical"), ("gemma", "sampled"),
                                        pytest.param("mistral", "empirical", marks=pytest.mark.slow)])
def test_per_token_fisher_factored_matches_float64(lms, which, kind):
    lm = lms[which]
    x, y = lm_data()
    fisher = factored_without_warning(lm, (x, y), kind=kind)
    ref = ft.reference_fisher_of(lm, x, y, loss=LOSS, kind=kind, seed=0)
    assert_matches(lm.trainable_variables, fisher, ref)


@pytest.mark.parametrize("which", ["gpt2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_last_token_exact_matches_float64(lms, which):
    """kind="exact" (V cotangents per example) through every rule, the tied table included
    (Gemma's RMS norm under K > 1: test_rms_norm_rule)."""
    model = last_token(lms[which])
    x, y = lm_data(1)
    fisher = factored_without_warning(model, (x, y[:, -1]), kind="exact", jit_compile=False)
    ref = ft.reference_fisher_of(model, x, y[:, -1], loss=LOSS, kind="exact")
    assert_matches(model.trainable_variables, fisher, ref)


def test_tied_embedding_is_the_square_of_the_sum(lms):
    """The GPT-2 table's Fisher is (lookup + projection)² per example, not the sum of the two
    squares: the untied twin (reverse table = Eᵀ, same function) gives the squares apart, and
    they differ from the tied Fisher that the factored rule matches."""
    lm = lms["gpt2"]
    x, y = lm_data(2)
    fisher = factored_without_warning(lm, (x, y), kind="empirical", jit_compile=False)
    table = lm.backbone.token_embedding.embeddings
    i = next(j for j, v in enumerate(lm.trainable_variables) if v is table)
    ref = ft.reference_fisher_of(lm, x, y, loss=LOSS, kind="empirical")[i]
    np.testing.assert_allclose(fisher[i], ref, rtol=0, atol=1e-4 * np.abs(ref).max())

    untied = _untied_copy(lm)
    parts = ft.reference_fisher_of(untied, x, y, loss=LOSS, kind="empirical")
    layer = untied.backbone.token_embedding
    names = [v.path for v in untied.trainable_variables]
    squares_apart = (parts[names.index(layer.embeddings.path)]
                     + parts[names.index(layer.reverse_embeddings.path)].T)
    assert np.abs(squares_apart - ref).max() > 0.05 * np.abs(ref).max()


def _untied_copy(lm):
    config = lm.backbone.get_config()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone.from_config(config)
    layer = backbone.token_embedding
    # GPT-2 always ties: untie this copy's layer and give it R = Eᵀ (the same function).
    layer.tie_weights = False
    layer._tracker.unlock()
    layer.reverse_embeddings = layer.add_weight(shape=(layer.output_dim, layer.input_dim),
                                                name="reverse_embeddings")
    layer._tracker.lock()
    untied = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    for src, dst in zip(lm.backbone.weights, [w for w in backbone.weights if w is not layer.reverse_embeddings]):
        dst.assign(src)
    layer.reverse_embeddings.assign(np.transpose(lm.backbone.token_embedding.embeddings.numpy()))
    x, _ = lm_data(2)
    np.testing.assert_allclose(untied(x), lm(x), atol=1e-5)
    return untied


def test_ewc_train_step_and_fit_on_a_causal_lm(lms):
    """consolidate on next tokens (factored, no warning), then make_train_step and EWCModel
    with keras_hub's own training loss (padding mask as per-position sample weight): the
    step's value is Keras' loss plus λ/2 Σ F (θ − θ*)², recomputed here in NumPy."""
    lm = _gemma()
    lm.set_weights(lms["gemma"].get_weights())
    x, y = lm_data(3)
    w = x["padding_mask"].astype("float32")
    ewc = fastewc.EWC(lm, lam=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher = ewc.consolidate((x, y), loss=LOSS, kind="empirical", jit_compile=False)
    assert_matches(lm.trainable_variables, fisher, ft.reference_fisher_of(lm, x, y, loss=LOSS))
    assert sorted(ewc.tracked_paths) == sorted(_relative_path(lm, v) for v in lm.trainable_variables)

    step = fastewc.make_train_step(lm, keras.optimizers.SGD(0.05), LOSS, ewc=ewc, jit_compile=False)
    for _ in range(2):
        step(x, y, w)
    state = ewc.state()
    penalty = 1.5 * sum(float(np.sum(state[_relative_path(lm, v)][0]
                                     * (v.numpy().astype(np.float64) - state[_relative_path(lm, v)][1]) ** 2))
                        for v in lm.trainable_variables)
    assert penalty > 0
    want = float(LOSS(y, lm(x, training=False), sample_weight=w)) + penalty
    np.testing.assert_allclose(float(step(x, y, w)), want, rtol=1e-4)

    wrapped = fastewc.EWCModel(lm, ewc)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    history = wrapped.fit(x, y, sample_weight=w, batch_size=N, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])) and history.history["ewc_penalty"][-1] > 0


# -- ReversibleEmbedding both ways, alone ---------------------------------------------------
D = 6


def _both_ways(tie_weights, soft_cap, positions):
    keras.utils.set_random_seed(31)
    inputs = keras.Input((positions,), dtype="int32")
    layer = keras.layers.ReversibleEmbedding(V, D, tie_weights=tie_weights, logit_soft_cap=soft_cap,
                                             embeddings_initializer="normal")
    hidden = keras.layers.Dense(D, activation="tanh")(layer(inputs))
    logits = layer(hidden, reverse=True)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(logits))
    if not tie_weights:
        layer.reverse_embeddings.assign(np.random.default_rng(32).normal(size=(D, V)))
    return model


@pytest.mark.parametrize("tie_weights,soft_cap,positions,chunk", [
    (True, None, 5, None),        # pairs of positions
    (True, 3.0, 12, None),        # per-example gradients, one einsum
    (True, None, 12, 2 * V * D),  # per-example gradients, a loop over chunks of 2 examples
    (False, None, 12, V * D)])    # untied: two tables, nothing crosses
def test_reversible_embedding_both_ways(monkeypatch, tie_weights, soft_cap, positions, chunk):
    if chunk is not None:
        monkeypatch.setattr(hub_rules, "EXAMPLE_FLOATS", chunk * 3)     # K = 3 cotangents
    model = _both_ways(tie_weights, soft_cap, positions)
    rng = np.random.default_rng(33)
    x = rng.integers(0, V, (N, positions)).astype("int32")
    x[1, :4] = 3                                         # repeated ids
    y = rng.integers(0, V, N)
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="sampled", num_samples=3,
                                     method="factored", seed=1)
    ref = ft.reference_fisher_of(model, x, y, loss=LOSS, kind="sampled", num_samples=3, seed=1)
    assert_matches(model.trainable_variables, fisher, ref)


# -- RMS normalizations --------------------------------------------------------------------
@pytest.mark.parametrize("norm_class", [keras.layers.RMSNormalization] + hub_rules.rms_norm_classes(),
                         ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
def test_rms_norm_rule(norm_class):
    keras.utils.set_random_seed(41)
    inputs = keras.Input((5, D))
    norm = norm_class()
    hidden = keras.layers.Dense(4, activation="tanh")(norm(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden)))
    norm.scale.assign(np.random.default_rng(42).normal(size=norm.scale.shape))
    rng = np.random.default_rng(43)
    x, y = rng.normal(size=(N, 5, D)).astype("float32"), rng.integers(0, 3, N)
    fisher = factored_without_warning(model, (x, y), kind="exact")
    assert_matches(model.trainable_variables, fisher, ft.reference_fisher_of(model, x, y, loss=LOSS, kind="exact"))
