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


def test_exact_is_the_joint_expectation_over_all_labelings():
    """2 positions x 3 classes: E over the 9 joint labelings of (Σ_t ∂ℓ_t/∂θ)², with the
    joint probability p_1(y_1) p_2(y_2), written out in float64 without the per-position
    formula; fastewc's exact (K·T cotangents) must equal it."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((2, 3)), L.Dense(4, activation="tanh"), L.Dense(3)])
    x = np.random.default_rng(6).normal(size=(3, 2, 3)).astype("float32")
    y = np.zeros((3, 2), "int32")
    twin = ft.float64_twin(model)
    sums = [np.zeros(v.shape) for v in twin.trainable_variables]
    for n in range(3):
        xn = tf.constant(x[n:n + 1].astype(np.float64))
        for labeling in itertools.product(range(3), repeat=2):
            with tf.GradientTape() as tape:
                logp = tf.nn.log_softmax(twin(xn)[0], axis=-1)
                nll = -(logp[0, labeling[0]] + logp[1, labeling[1]])
            joint = float(np.exp(-nll.numpy()))
            for s, g in zip(sums, tape.gradient(nll, twin.trainable_variables)):
                s += joint * np.square(g.numpy())
    want = [s / 3 for s in sums]
    for method in ("factored", "vmap"):
        assert_matches(fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method), want)
    assert_matches(ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact"), want, rtol=1e-10)


def test_sample_weight_per_position_tuple_and_dataset():
    """(x, y, sample_weight) arrays and a dataset of such batches: the weighted sum."""
    model = segmenter()
    x, y = seg_data()
    w = np.random.default_rng(8).uniform(0.0, 2.0, (3, 3, 3)).astype("float32")
    w[0, 0, :] = 0.0
    want = ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="empirical", sample_weight=w)
    unweighted = ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="empirical")
    assert not np.allclose(want[0], unweighted[0], rtol=1e-3)
    assert_matches(fastewc.fisher_diagonal(model, (x, y, w), loss=LOGITS), want)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(2)
    assert_matches(fastewc.fisher_diagonal(model, ds, loss=LOGITS, method="vmap"), want)
    # A per-example weight (batch,) broadcasts over the positions.
    we = np.array([1.0, 0.0, 2.0], "float32")
    assert_matches(fastewc.fisher_diagonal(model, (x, y, we), loss=LOGITS, kind="exact"),
                   ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact", sample_weight=we))


def test_mean_over_positions_is_one_over_t_squared_of_the_sum():
    """positions="mean": per example the Fisher of the sum divided by T², T its number of
    unmasked positions (checked one example at a time against the sum's oracle)."""
    model = causal_lm()
    x, y = lm_data()
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", positions="mean")
    want = [np.zeros(v.shape) for v in model.trainable_variables]
    for n in range(5):
        xn = {k: v[n:n + 1] for k, v in x.items()}
        t = x["padding_mask"][n].sum()
        one = ft.reference_fisher_of(model, xn, y[n:n + 1], loss=LOGITS, kind="exact")
        want = [a + b / t**2 / 5 for a, b in zip(want, one)]
    assert_matches(got, want)


def test_an_all_padding_example_contributes_zero_and_counts_in_n():
    model = causal_lm()
    x, y = lm_data(4)
    x["padding_mask"][1] = 0
    three = {k: v[[0, 2, 3]] for k, v in x.items()}
    for positions in ("sum", "mean"):
        got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", positions=positions)
        rest = ft.reference_fisher_of(model, three, y[[0, 2, 3]], loss=LOGITS, kind="exact", positions=positions)
        assert all(np.all(np.isfinite(g)) for g in got)
        assert_matches(got, [r * 3 / 4 for r in rest])


@pytest.mark.parametrize("loss", ["binary_crossentropy", "mse"])
def test_binary_and_mse_per_position_with_a_keras_mask(loss):
    """(batch, T, units) outputs of a masked sequence model: the masked sum over positions."""
    keras.utils.set_random_seed(9)
    tokens = keras.Input((T,), dtype="int32")
    h = L.Embedding(8, 3, mask_zero=True)(tokens)
    h = L.SimpleRNN(3, return_sequences=True)(h)
    model = keras.Model(tokens, L.Dense(2, activation="sigmoid" if loss != "mse" else None)(h))
    x, _ = tagger_data()
    y = np.random.default_rng(9).integers(0, 2, (3, T, 2)).astype("float32")
    for kind in ("empirical", "exact"):
        want = ft.reference_fisher_of(model, x, y, loss=loss, kind=kind)
        for method in ("factored", "loop"):
            assert_matches(fastewc.fisher_diagonal(model, (x, y), loss=loss, kind=kind, method=method), want)


def test_one_hot_labels_per_position():
    model = tagger()
    x, y = tagger_data()
    onehot = np.eye(3, dtype="float32")[y]
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    assert_matches(fastewc.fisher_diagonal(model, (x, onehot), loss=loss, kind="empirical"),
                   ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="empirical"))


# -- errors (item 5) ---------------------------------------------------------------------
def test_labels_not_matching_the_positions_raise_naming_y():
    model = causal_lm()
    x, y = lm_data()
    with pytest.raises(ValueError, match=r"`data` labels \(y\) must be integer class ids of shape \(batch, 4\), "
                                         r"one per position.*Received: labels of shape \(batch, 3\)"):
        fastewc.fisher_diagonal(model, (x, y[:, :3]), loss=LOGITS)
    with pytest.raises(ValueError, match=r"one-hot rows of shape \(batch, 4, 5\)"):
        fastewc.fisher_diagonal(model, (x, y), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"class ids in \[0, 5\).*Received: labels in \[\d, 5\].*Padded positions"):
        fastewc.fisher_diagonal(model, (x, np.where(y == 0, 5, y)), loss=LOGITS)


def test_token_ids_outside_the_vocabulary_raise_naming_the_embedding():
    model = causal_lm()
    x, y = lm_data()
    x["token_ids"][2, 1] = V + 3
    with pytest.raises(ValueError, match=r"input_dim=5\) ids outside its table.*Received: ids in \[0, 8\]"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)


def test_masks_and_sample_weights_of_the_wrong_shape_raise():
    model = causal_lm()
    x, y = lm_data()
    with pytest.raises(ValueError, match=r"`data` sample_weight must weigh each example or each output position: "
                                         r"shape \(batch,\) or \(batch, 4\) .*Received: `data` sample_weight of "
                                         r"shape \(batch, 5\)"):
        fastewc.fisher_diagonal(model, (x, y, np.ones((5, 5))), loss=LOGITS)
    with pytest.raises(ValueError, match=r"`data` sample_weight must be finite and >= 0"):
        fastewc.fisher_diagonal(model, (x, y, -np.ones((5, 4))), loss=LOGITS)
    # A padding mask that does not cover the output positions.
    tokens = keras.Input((T,), dtype="int32", name="token_ids")
    padding = keras.Input((T + 1,), dtype="int32", name="padding_mask")
    h = L.Embedding(V, 3)(tokens) * keras.ops.mean(keras.ops.cast(padding, "float32"))
    other = keras.Model({"token_ids": tokens, "padding_mask": padding}, L.Dense(V)(h))
    xp = {"token_ids": x["token_ids"], "padding_mask": np.ones((5, T + 1), "int32")}
    with pytest.raises(ValueError, match=r"`data` x\['padding_mask'\] must weigh each example or each output "
                                         r"position.*Received: `data` x\['padding_mask'\] of shape \(batch, 5\)"):
        fastewc.fisher_diagonal(other, (xp, y), loss=LOGITS)


def test_exact_beyond_the_cotangent_limit_raises_before_any_work(monkeypatch):
    """K·T = 4 (logits: V − 1) x 4 positions = 16 backward passes per example."""
    from fastewc import likelihood
    monkeypatch.setattr(likelihood, "MAX_EXACT_COTANGENTS", 8)
    model = causal_lm()
    x, y = lm_data()
    ewc = fastewc.EWC(model, lam=1.0)
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"`kind`='exact' needs 16 backward passes per example \(4 per position x "
                                         r"4 positions\).*Use kind='sampled'"):
        ewc.consolidate((x, y), loss=LOGITS)
    assert ewc.num_tasks == 0
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_variables))


def test_the_loss_reduction_is_ignored():
    """The Fisher is of each example's log-likelihood: Keras' batch reduction ("sum",
    "none", ...) does not change it; `positions` chooses the per-example normalisation."""
    model = segmenter()
    x, y = seg_data()
    want = ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact")
    for reduction in ("sum", None):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
        assert_matches(fastewc.fisher_diagonal(model, (x, y), loss=loss, kind="exact"), want)


def test_bad_consolidation_leaves_the_state_unchanged():
    model = causal_lm()
    x, y = lm_data()
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.consolidate((x, y), loss=LOGITS, kind="empirical")
    anchor = [a.numpy() for a in ewc.anchors] if hasattr(ewc, "anchors") else None
    penalty = float(ewc.penalty())
    with pytest.raises(ValueError, match="sample_weight"):
        ewc.consolidate((x, y, np.ones((5, 3))), loss=LOGITS, kind="empirical")
    assert ewc.num_tasks == 1 and float(ewc.penalty()) == penalty
    if anchor is not None:
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(anchor, ewc.anchors))


# -- EWC and training on a causal LM -----------------------------------------------------
@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_consolidate_a_causal_lm(curvature):
    model = causal_lm()
    x, y = lm_data()
    ewc = fastewc.EWC(model, lam=2.0, curvature=curvature)
    fisher = ewc.consolidate((x, y), loss=LOGITS, kind="exact")
    if curvature == "diagonal":
        assert_matches(fisher, ft.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact"))
    else:          # the embedding is a Kronecker block: A = diag(mean token counts per position)
        table = next(b for b in fisher.blocks if "embedding" in b.variables[0].path)
        ids = x["token_ids"]
        np.testing.assert_allclose(table.a, np.bincount(ids.reshape(-1), minlength=V) / ids.size, rtol=1e-6)
    assert ewc.num_tasks == 1 and float(ewc.penalty()) == 0.0


def test_make_train_step_with_a_per_position_sample_weight():
    """The step's loss is Keras' with the per-position weights; with EWC its gradient adds
    λ F (θ − θ*), F the masked Fisher."""
    model = causal_lm()
    x, y = lm_data()
    w = x["padding_mask"].astype("float32")
    ewc = fastewc.EWC(model, lam=1.0)
    ewc.consolidate((x, y, w), loss=LOGITS, kind="sampled", seed=0)
    opt = keras.optimizers.SGD(0.1)
    step = fastewc.make_train_step(model, opt, LOGITS, ewc=ewc)
    want = float(LOGITS(y, model(x, training=False), sample_weight=w))
    got = float(step(x, y, w))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(ewc.penalty()) > 0.0


def test_bad_positions_and_data_containers_raise():
    model = tagger()
    x, y = tagger_data()
    with pytest.raises(ValueError, match=r"`positions` must be one of 'sum', 'mean'. Received: positions='tokens'"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, positions="tokens")
    with pytest.raises(ValueError, match=r"`data` must be a tuple \(x, y\) or \(x, y, sample_weight\)"):
        fastewc.fisher_diagonal(model, (x, y, y, y), loss=LOGITS)
