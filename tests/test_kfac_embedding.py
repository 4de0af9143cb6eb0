"""Kronecker blocks of Embedding tables (issue 25, item 3b) against float64.

An Embedding is a Dense layer on one-hot rows without a bias, so with the Dense rule's
convention (positions as examples) its A is diagonal, the mean token counts per position,
a_v = (1/N) Σ_n (1/L) Σ_t m_nt [ids_nt = v], kept as a vector of V floats, and
G = (1/N) Σ_n E_y[Σ_t m_nt δ_nt δ_ntᵀ] (m_nt = 0 at a masked position: id 0 under
``mask_zero``).  The oracle counts the ids in NumPy and takes each example's deltas from a
tape on a float64 twin; the penalty and its gradient are checked against
np.kron(diag(a), G) formed densely at V = 6 (with damping, after save / load and a
checkpoint restore, and online mode's decay); a tied table read both ways (a GPT-2
language-model head) keeps its diagonal.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import kronecker, testing

from conftest import assert_close

# Flatten drops the Keras mask on purpose (the masked positions' deltas are then not zero).
pytestmark = pytest.mark.filterwarnings("ignore:Layer .* does not support masking:UserWarning")

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
V, D, T, N = 6, 4, 3, 4
LAM, DAMPING = 3.0, 0.01


def _model(mask_zero=True):
    """Embedding → Dense over positions → Flatten (which ignores the mask, so the masked
    positions' deltas are not zero: the rule must drop them) → Dense."""
    keras.utils.set_random_seed(3)
    ids = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(V, D, mask_zero=mask_zero, name="emb")(ids)
    h = keras.layers.Dense(3, activation="tanh", name="mid")(h)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h)))


def _data(seed=4):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, V, (N, T)).astype("int32")
    x[0, :2] = 2                    # an id repeated within one example
    x[1, 2] = x[3, 1:] = 0          # padding (masked with mask_zero)
    return x, rng.integers(0, 3, N)


def _reference_factors(model, x, y, kind, mask_zero=True):
    """(a, G) of the table, float64: a from the ids, G from one tape per example."""
    twin = testing.float64_twin(model)
    layer = twin.get_layer("emb")
    seen = {}

    def call(inputs):
        seen["z"] = tf.gather(layer.embeddings, tf.cast(inputs, tf.int32))
        return seen["z"]

    object.__setattr__(layer, "call", call)
    a, g, masked = np.zeros(V), np.zeros((D, D)), 0.0
    try:
        for n in range(N):
            keep = x[n] != 0 if mask_zero else np.ones(T, bool)
            np.add.at(a, x[n][keep], 1.0 / T)
            with tf.GradientTape(persistent=True) as tape:
                out = twin(x[n:n + 1])
                outcomes = testing._outcomes(LOGITS, kind, out[0], y[n], None)
            for weight, target in outcomes:
                delta = tape.gradient(target, seen["z"]).numpy().reshape(T, D)
                masked += np.abs(delta[~keep]).sum()
                g += weight * delta[keep].T @ delta[keep]
            del tape
    finally:
        layer.__dict__.pop("call", None)
    assert masked > 0 or not mask_zero      # masked positions have deltas: the rule must drop them
    return a / N, g / N


@pytest.mark.parametrize("kind", ["exact", pytest.param("empirical", marks=pytest.mark.slow)])
def test_embedding_factors_match_float64(kind):
    model = _model()
    x, y = _data()
    result = fastewc.kfac_fisher(model, (x, y), loss=LOGITS, kind=kind, batch_size=3)   # a padded batch
    blocks = {block.layer: block for block in result.blocks}
    assert set(blocks) == {"emb", "mid", "head"}
    a, g = _reference_factors(model, x, y, kind)
    assert blocks["emb"].a.shape == (V,) and a[0] == 0
    assert_close(blocks["emb"].a, a)
    assert_close(blocks["emb"].g, g)
    assert all(f is None for f in result.diagonal)
    table = result.full_diagonal()[0]
    assert_close(table, np.outer(a, np.diag(g)))


@pytest.mark.slow
def test_embedding_without_mask_counts_every_position():
    model = _model(mask_zero=False)
    x, y = _data()
    a, g = _reference_factors(model, x, y, "exact", mask_zero=False)
    block = fastewc.kfac_fisher(model, (x, y), loss=LOGITS, kind="exact").blocks[0]
    assert block.layer == "emb" and a[0] > 0
    assert_close(block.a, a)
    assert_close(block.g, g)


# -- the penalty ------------------------------------------------------------------------------
def _matrix(values):
    """The block's W̄: the kernel as (rows, units), the bias as the last row (float64)."""
    kernel = np.asarray(values[0], np.float64)
    rows = [kernel.reshape(-1, kernel.shape[-1])] + [np.asarray(b, np.float64)[None] for b in values[1:]]
    return np.concatenate(rows)


def _damped(a, g, damping):
    """Factored Tikhonov damping with π (Martens & Grosse 2015 §6.3), A dense (diag(a))."""
    a = np.diag(a) if a.ndim == 1 else a
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    root = np.sqrt(damping)
    return a + pi * root * np.eye(len(a)), g + root / pi * np.eye(len(g))


def _kron_penalty(model, terms, lam, damping):
    """λ/2 Σ_blocks Σ_t c_t vec(W̄ − W̄_t)ᵀ (A_t,δ ⊗ G_t,δ) vec(W̄ − W̄_t) and its gradient per
    variable path, float64, each block's matrix np.kron formed densely.  ``terms``:
    {layer name: [(c, a, G, anchor values)]}."""
    value, grads = 0.0, {}
    for name, layer_terms in terms.items():
        variables = model.get_layer(name).trainable_variables
        w = _matrix([v.numpy() for v in variables])
        grad = np.zeros(w.size)
        for c, a, g, anchor in layer_terms:
            big = np.kron(*_damped(np.asarray(a, np.float64), np.asarray(g, np.float64), damping))
            diff = (w - _matrix(anchor)).reshape(-1)
            value += 0.5 * lam * c * diff @ big @ diff
            grad += lam * c * big @ diff
        grad = grad.reshape(w.shape)
        rows = int(np.prod(variables[0].shape[:-1]))
        grads[variables[0].path] = grad[:rows].reshape(variables[0].shape)
        if len(variables) > 1:
            grads[variables[1].path] = grad[rows]
    return value, grads


def _terms(fisher, anchors, coef=1.0):
    return {block.layer: [(coef, block.a, block.g, [anchors[v.path] for v in block.variables])]
            for block in fisher.blocks}


def _move(model, seed):
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))


def _weights(model):
    return {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}


def _assert_penalty(model, ewc, want):
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    grads = tape.gradient(value, model.trainable_variables)
    assert_close(value, want[0])
    for v, g in zip(model.trainable_variables, grads):
        assert_close(tf.convert_to_tensor(g), want[1][v.path])


def _consolidated_and_moved():
    model = _model()
    x, y = _data()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac", damping=DAMPING)
    fisher = ewc.consolidate((x, y), loss=LOGITS, kind="exact")
    state = ewc.kronecker_state()
    assert state[("emb/embeddings", None)][0][1].shape == (V,)      # A kept as its diagonal
    anchors = _weights(model)
    _move(model, 6)
    return model, ewc, _kron_penalty(model, _terms(fisher, anchors), LAM, DAMPING)


def test_embedding_penalty_matches_np_kron():
    model, ewc, want = _consolidated_and_moved()
    _assert_penalty(model, ewc, want)


def test_embedding_penalty_after_save_load_and_checkpoint(tmp_path):
    model, ewc, want = _consolidated_and_moved()
    path = str(tmp_path / "ewc.npz")
    ewc.save(path)
    _assert_penalty(model, fastewc.EWC.load(path, model), want)
    restored = fastewc.EWC(model, lam=LAM, curvature="kfac", damping=DAMPING)
    tf.train.Checkpoint(ewc=restored).restore(
        tf.train.Checkpoint(ewc=ewc).save(str(tmp_path / "ckpt"))).assert_consumed()
    _assert_penalty(model, restored, want)


def test_embedding_online_decay():
    """Online, kfac_sum='exact': the first task's terms decayed by γ, every anchor the
    latest weights."""
    model = _model()
    ewc = fastewc.EWC(model, lam=LAM, curvature="kfac", mode="online", gamma=0.5)
    first = ewc.consolidate(_data(4), loss=LOGITS, kind="exact")
    _move(model, 7)
    second = ewc.consolidate(_data(5), loss=LOGITS, kind="exact")
    anchors = _weights(model)
    _move(model, 8)
    terms = _terms(first, anchors, 0.5)
    for name, layer_terms in _terms(second, anchors).items():
        terms[name] += layer_terms
    assert [float(t[0]) for t in ewc.kronecker_state()[("emb/embeddings", None)]] == [0.5, 1.0]
    _assert_penalty(model, ewc, _kron_penalty(model, terms, LAM, 0.0))


def test_nearest_kronecker_of_diagonal_factors_matches_dense_svd():
    """kfac_sum='nearest' with diagonal A's: the Kronecker product nearest to
    Σ_t c_t diag(a_t) ⊗ G_t, against the leading singular pair of its rearrangement
    (Van Loan & Pitsianis) formed densely; the merged A stays a vector."""
    rng = np.random.default_rng(9)
    coefs = [0.5, 1.0]
    a_list = [rng.uniform(0, 1, V) for _ in coefs]
    g_list = [(lambda m: m @ m.T)(rng.normal(size=(D, D))) for _ in coefs]
    a, g, error = kronecker.nearest_kronecker(coefs, a_list, g_list)
    assert a.shape == (V,)
    r = sum(c * np.outer(np.diag(ai).reshape(-1), gi.reshape(-1)) for c, ai, gi in zip(coefs, a_list, g_list))
    u, s, vt = np.linalg.svd(r)
    want = s[0] * np.kron(u[:, 0].reshape(V, V), vt[0].reshape(D, D))
    assert_close(np.kron(np.diag(a.numpy()), g.numpy()), want)
    assert_close(error, np.sqrt(np.sum(s[1:] ** 2) / np.sum(s ** 2)))


# -- keras_hub ------------------------------------------------------------------------------
HUB_V, HUB_T = 12, 5


def _gpt2_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(11)
    return keras_hub.models.GPT2Backbone(vocabulary_size=HUB_V, num_layers=1, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=8)


def _hub_data(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, HUB_V, (3, HUB_T + 1)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((3, HUB_T), "int32")}, ids[:, 1:]


def test_gpt2_backbone_token_embedding_gets_a_kronecker_block():
    """A GPT-2 backbone with a classification head on the last token: its token table (a
    ReversibleEmbedding read once, as a lookup) is a Kronecker block with A the token counts;
    the position table keeps its diagonal."""
    backbone = _gpt2_backbone()
    model = keras.Model(backbone.inputs, keras.layers.Dense(3, name="cls")(backbone.output[:, -1, :]))
    x, ids = _hub_data()
    y = ids[:, -1] % 3
    ewc = fastewc.EWC(model, lam=1.0, curvature="kfac")
    fisher = ewc.consolidate((x, y), loss=LOGITS, kind="empirical")
    blocks = {block.layer: block for block in fisher.blocks}
    counts = np.bincount(x["token_ids"].reshape(-1), minlength=HUB_V) / x["token_ids"].size
    assert_close(blocks["token_embedding"].a, counts)
    assert "position_embedding" not in blocks
    assert ewc.kronecker_state()[("token_embedding/embeddings", None)][0][1].shape == (HUB_V,)


def _tied_lm_table_diagonal():
    """GPT2CausalLM reads its table both ways (lookup and LM head): not one Kronecker
    product, so the table keeps its diagonal, as before this block existed.  Returns
    (lm, x, y, the table's diagonal)."""
    lm = pytest.importorskip("keras_hub").models.GPT2CausalLM(backbone=_gpt2_backbone(), preprocessor=None)
    x, y = _hub_data(1)
    result = fastewc.kfac_fisher(lm, (x, y), loss=LOGITS, kind="empirical")
    table = lm.backbone.token_embedding.embeddings
    assert all(all(v is not table for v in block.variables) for block in result.blocks)
    assert {block.layer for block in result.blocks} >= {"query", "feedforward_output_dense"}
    i = next(j for j, v in enumerate(result.variables) if v is table)
    assert result.diagonal[i].shape == table.shape
    return lm, x, y, result.diagonal[i]


def test_tied_lm_head_keeps_its_diagonal():
    """(Its values against the float64 per-token oracle: the slow variant below, and
    tests/test_hub_causal_lm.py for curvature='diagonal', the same rule.)"""
    _tied_lm_table_diagonal()


@pytest.mark.slow
def test_tied_lm_head_diagonal_matches_float64():
    lm, x, y, got = _tied_lm_table_diagonal()
    i = next(j for j, v in enumerate(lm.trainable_variables) if v is lm.backbone.token_embedding.embeddings)
    want = testing.reference_fisher_of(lm, x, y, loss=LOGITS, kind="empirical")[i]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_shared_embedding_is_refused_and_ids_outside_the_table_raise():
    """A plain Embedding called twice has no merge: curvature='kfac' refuses it, as before;
    ids outside the table raise the Embedding's error."""
    keras.utils.set_random_seed(12)
    a, b = keras.Input((T,), dtype="int32"), keras.Input((T,), dtype="int32")
    shared = keras.layers.Embedding(V, D, name="shared")
    joined = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], keras.layers.Dense(3)(keras.layers.Flatten()(joined)))
    x, y = _data()
    with pytest.raises(ValueError, match=r"Layer 'shared' \(Embedding\).*curvature='kfac' cannot take a shared layer"):
        fastewc.kfac_fisher(model, ([x, x], y), loss=LOGITS)
    x[2, 1] = V + 2
    with pytest.raises(ValueError, match=r"layer 'emb' \(Embedding, input_dim=6\) ids outside its table"):
        fastewc.kfac_fisher(_model(), (x, y), loss=LOGITS)
