"""Training a model with an Embedding (a sparse data gradient) with an EWC attached, with
both trainers, against a float64 reference update θ − lr·(∇L + ∇P) (issue 26, item 1).

∇L comes from a float64 tape over a float64 copy of the model; ∇P is written out here in
NumPy from the EWC's state (diagonal: λA(θ − μ); Kronecker: λ Σ_t c_t A_t (W̄ − W̄_t) G_t),
not from fastewc's penalty code.  Also: Embedding ids outside the table counted inside the
compiled step (item 11), and the single-output contract of make_train_step (item 7)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from conftest import assert_close

VOCAB, DIM, LENGTH, CLASSES, N = 7, 3, 4, 3, 6
LR, LAM = 0.5, 3.0
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _text_model(dtype=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((LENGTH,), dtype="int32"),
        keras.layers.Embedding(VOCAB, DIM, name="tokens", dtype=dtype),
        keras.layers.GlobalAveragePooling1D(dtype=dtype),
        keras.layers.Dense(CLASSES, name="head", dtype=dtype),
    ])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB - 2, size=(N, LENGTH)).astype("int32")   # rows 5, 6 unused
    return ids, rng.integers(0, CLASSES, N).astype("int32")


def _weights64(model):
    return [v.numpy().astype(np.float64) for v in model.trainable_variables]


def _data_gradient64(thetas, ids, y):
    """∇L at the weights ``thetas``, from a float64 copy of the model and a float64 tape."""
    twin = _text_model(dtype="float64")
    for w, t in zip(twin.trainable_variables, thetas):
        w.assign(t)
    with tf.GradientTape() as tape:
        logits = twin(ids, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, twin.trainable_variables)]


def _penalty_gradient64(model, ewc, thetas):
    """∇P at ``thetas`` in float64 NumPy from the EWC's state (zeros before the first task)."""
    lam, paths = ewc.lam, [v.path for v in model.trainable_variables]
    grads = [np.zeros_like(t) for t in thetas]
    if ewc.num_tasks == 0:
        return grads
    for i, (a, mu) in enumerate(ewc.state().values()):
        grads[i] += lam * a.astype(np.float64) * (thetas[i] - mu.astype(np.float64))
    for (kernel_key, bias_key), terms in ewc.kronecker_state().items():
        k = next(i for i, p in enumerate(paths) if p.endswith(kernel_key))
        w = thetas[k].reshape(-1, thetas[k].shape[-1])
        if bias_key is not None:         # the bias is W̄'s last row (the Embedding has none)
            b = next(i for i, p in enumerate(paths) if p.endswith(bias_key))
            w = np.concatenate([w, thetas[b][None]], 0)
        # An Embedding's A is kept as its diagonal (the token counts): A = diag(a).
        m = sum(float(c) * (np.diag(a) if a.ndim == 1 else a).astype(np.float64) @ (w - anchor)
                @ g.astype(np.float64) for c, a, g, anchor in terms)
        grads[k] += lam * m[:thetas[k].shape[0]]
        if bias_key is not None:
            grads[b] += lam * m[-1]
    return grads


def _expected_update(model, ewc, ids, y, thetas=None):
    """θ − lr·(∇L + ∇P) in float64, at ``thetas`` (default: the model's weights)."""
    thetas = _weights64(model) if thetas is None else thetas
    grads = [d + p for d, p in zip(_data_gradient64(thetas, ids, y),
                                   _penalty_gradient64(model, ewc, thetas))]
    return [t - LR * g for t, g in zip(thetas, grads)]


def _trainer(kind, model, ewc, jit):
    if kind == "make_train_step":
        step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS, ewc=ewc, jit_compile=jit)
        return lambda ids, y: step(ids, y)
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS, jit_compile=jit)
    return lambda ids, y: wrapped.fit(ids, y, batch_size=N, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kind", ["make_train_step", "fit"])
def test_embedding_model_trains_with_ewc_like_the_float64_update(kind, jit, curvature):
    model = _text_model()
    ewc = fastewc.EWC(model, lam=LAM, curvature=curvature)
    train = _trainer(kind, model, ewc, jit)
    ids, y = _data()

    expected = _expected_update(model, ewc, ids, y)            # before any task: ∇L alone
    train(ids, y)
    for got, want in zip(model.trainable_variables, expected):
        assert_close(got.numpy(), want, rtol=1e-5)

    ewc.consolidate((ids, y), loss=LOSS)
    # KFAC: the Embedding's block (A the token counts) and the Dense's.
    assert len(ewc.kronecker_state()) == (2 if curvature == "kfac" else 0)
    rng = np.random.default_rng(3)                              # move away from the anchors
    for v in model.trainable_variables:
        v.assign(v.numpy() + rng.normal(0, 0.5, v.shape).astype(np.float32))
    ids2, y2 = _data(seed=1)
    expected = _expected_update(model, ewc, ids2, y2)
    assert np.abs(_penalty_gradient64(model, ewc, _weights64(model))[0]).max() > 1e-2
    train(ids2, y2)
    for got, want in zip(model.trainable_variables, expected):
        assert_close(got.numpy(), want, rtol=1e-5)


def test_embedding_rows_outside_the_batch_get_the_penalty_gradient():
    """Rows no id of the batch reads have a zero data gradient but a penalty gradient
    λA(θ − μ): the sum is dense, not the batch's rows only."""
    model = _text_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ids, y = _data()
    rng = np.random.default_rng(4)
    fisher = [rng.uniform(0.5, 1.0, v.shape).astype("float32") for v in model.trainable_variables]
    ewc.add_task(fisher)
    table = model.trainable_variables[0]
    before = table.numpy().astype(np.float64)
    anchor = before.copy()
    table.assign((before + 1.0).astype(np.float32))
    step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS, ewc=ewc, jit_compile=False)
    step(ids, y)
    unused = slice(VOCAB - 2, VOCAB)                            # rows 5 and 6: no data gradient
    expected = (before + 1.0) - LR * LAM * fisher[0].astype(np.float64) * ((before + 1.0) - anchor)
    assert_close(table.numpy()[unused], expected[unused], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_sparse_gradient_rows_are_added_into_the_scaled_penalty_gradient(jit):
    """scaled_sum with a tf.IndexedSlices data gradient (rows repeated, rows absent) and a
    dense one: g + s·p against float64 NumPy, eagerly and under XLA."""
    from fastewc._penalty_term import scaled_sum
    rng = np.random.default_rng(6)
    table, dense = tf.Variable(np.zeros((VOCAB, DIM), np.float32)), tf.Variable(np.zeros(DIM, np.float32))
    p_table, p_dense = rng.normal(size=(VOCAB, DIM)).astype(np.float32), rng.normal(size=DIM).astype(np.float32)
    rows, ids = rng.normal(size=(5, DIM)).astype(np.float32), np.array([4, 1, 4, 0, 4], np.int32)
    g_dense, scale = rng.normal(size=DIM).astype(np.float32), 0.25

    @tf.function(jit_compile=jit, autograph=False)
    def summed():
        sparse = tf.IndexedSlices(tf.constant(rows), tf.constant(ids), tf.constant([VOCAB, DIM]))
        return scaled_sum([sparse, tf.constant(g_dense)], [table, dense],
                          [tf.constant(p_table), tf.constant(p_dense)], [table, dense], tf.constant(scale))

    got_table, got_dense = summed()
    want_table = scale * p_table.astype(np.float64)
    np.add.at(want_table, ids, rows.astype(np.float64))
    assert_close(got_table.numpy(), want_table, rtol=1e-6)
    assert_close(got_dense.numpy(), g_dense + scale * p_dense.astype(np.float64), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_embedding_with_stop_on_nonfinite_and_steps_per_call(jit):
    """Sparse data gradients through the stop_on_nonfinite cond and the k-step loop: two
    steps in one call equal two float64 updates; a non-finite step is not applied."""
    model = _text_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.consolidate(_data(seed=2), loss=LOSS)
    rng = np.random.default_rng(5)
    for v in model.trainable_variables:
        v.assign(v.numpy() + rng.normal(0, 0.5, v.shape).astype(np.float32))
    step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS, ewc=ewc, jit_compile=jit,
                                   steps_per_call=2, stop_on_nonfinite=True)
    (a, ya), (b, yb) = _data(seed=0), _data(seed=1)
    expected = _expected_update(model, ewc, b, yb, thetas=_expected_update(model, ewc, a, ya))
    losses = step(np.stack([a, b]), np.stack([ya, yb]))
    assert losses.shape == (2,)
    for got, want in zip(model.trainable_variables, expected):
        assert_close(got.numpy(), want, rtol=1e-5)

    model.layers[-1].bias.assign(np.full(CLASSES, np.nan, np.float32))
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(FloatingPointError, match="step 0 of this call"):
        step(np.stack([a, b]), np.stack([ya, yb]))
    for got, want in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(got.numpy(), want)


# -- ids outside the table: counted inside the compiled step (issue 26, item 11) ----------
def _bad_ids_message(low, high):
    return (rf"`x` feeds layer 'tokens' \(Embedding, input_dim={VOCAB}\) ids outside its table: ids must "
            rf"lie in \[0, {VOCAB}\) .*Received: ids in \[{low}, {high}\]")


@pytest.mark.parametrize("jit", [False, True])
def test_valid_ids_are_not_read_on_the_host(jit, monkeypatch):
    """The step counts the ids in its compiled function: the host check of the inputs
    (a .numpy() of x before every step) is not called on one device."""
    from fastewc import train as train_lib

    calls = []
    host_check = train_lib.TrainStep._check_ids
    monkeypatch.setattr(train_lib.TrainStep, "_check_ids",
                        lambda self, x: calls.append(1) or host_check(self, x))
    model = _text_model()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS,
                                   ewc=fastewc.EWC(model, lam=LAM), jit_compile=jit)
    ids, y = _data()
    expected = _expected_update(model, step.ewc, ids, y)
    step(ids, y)
    assert calls == []
    for got, want in zip(model.trainable_variables, expected):   # and it trained
        assert_close(got.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_ids_outside_the_table_in_a_later_step_stop_the_call_there(jit):
    """steps_per_call=2, the second batch has an id outside the table: the first update is
    applied (the float64 update), the second is not, and the error names that step."""
    model = _text_model()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS,
                                   ewc=fastewc.EWC(model, lam=LAM), jit_compile=jit, steps_per_call=2)
    (a, ya), (b, yb) = _data(seed=0), _data(seed=1)
    b = b.copy()
    b[2, 1] = VOCAB + 3
    expected = _expected_update(model, step.ewc, a, ya)
    with pytest.raises(ValueError, match=_bad_ids_message(0, VOCAB + 3) + r".*step 1 of this call \(2 steps\)"):
        step(np.stack([a, b]), np.stack([ya, yb]))
    for got, want in zip(model.trainable_variables, expected):
        assert_close(got.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_ids_outside_the_table_of_an_inner_embedding_raise_and_change_nothing(jit):
    """An Embedding the model input does not feed directly (a subclassed model): under XLA
    its gather would clamp the ids silently; the compiled step counts them."""
    class Bag(keras.Model):
        def __init__(self):
            super().__init__()
            self.tokens = keras.layers.Embedding(VOCAB, DIM, name="tokens")
            self.out = keras.layers.Dense(CLASSES)

        def call(self, x):
            return self.out(tf.reduce_mean(self.tokens(x + 1), axis=1))

    model = Bag()
    model(np.zeros((1, LENGTH), "int32"))
    step = fastewc.make_train_step(model, keras.optimizers.Adam(0.1), LOSS, jit_compile=jit)
    ids, y = _data()
    ids[4, 0] = VOCAB - 1                               # read as VOCAB: outside
    before = [v.numpy() for v in model.trainable_variables + step.optimizer.variables]
    with pytest.raises(ValueError, match=_bad_ids_message(1, VOCAB) + ".*This step's update was not applied"):
        step(ids, y)
    for v, b in zip(model.trainable_variables + step.optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    ids[4, 0] = 0
    step(ids, y)                                          # valid ids: it trains
    assert not np.array_equal(model.trainable_variables[0].numpy(), before[0])


# -- several outputs (issue 26, item 7) ---------------------------------------------------
def _two_heads():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="h")(inp)
    return keras.Model(inp, [keras.layers.Dense(2, name="ha")(h), keras.layers.Dense(3, name="hb")(h)])


def test_make_train_step_refuses_several_outputs_and_ewcmodel_trains_them():
    model = _two_heads()
    with pytest.raises(ValueError, match=r"`model` must have one output: .*Received: model '.*' with 2 "
                                         r"outputs \(from layers \['ha', 'hb'\]\)\. Train it with fastewc.EWCModel"):
        fastewc.make_train_step(model, keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype("float32")
    ya, yb = rng.normal(size=(6, 2)).astype("float32"), rng.normal(size=(6, 3)).astype("float32")
    # the advised route: a loss per output, summed (Keras fit), penalty 0 before any task
    wrapped = fastewc.EWCModel(model, fastewc.EWC(model, lam=LAM))
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse", "mse"])
    outs = [o.astype(np.float64) for o in (t.numpy() for t in model(x))]
    expected = np.mean((outs[0] - ya) ** 2) + np.mean((outs[1] - yb) ** 2)
    got = wrapped.fit(x, [ya, yb], batch_size=6, verbose=0).history["loss"][-1]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("y_of", [list, tuple, lambda ys: {"a": ys[0], "b": ys[1]}])
def test_train_step_refuses_several_labels_naming_y(y_of):
    model = _text_model()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(LR), LOSS, jit_compile=False)
    ids, y = _data()
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"`y` must be one array or tensor: .* Received: y as a \w+ of 2 arrays"):
        step(ids, y_of([y, y]))
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
