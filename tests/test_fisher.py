"""fisher_diagonal against the independent float64 per-example reference."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import fisher as fisher_lib
from fastewc.testing import float64_twin, reference_fisher, reference_fisher_of

from conftest import branched, data, mlp

METHODS = ["loop", "vmap", "jacobian", "factored"]
KINDS = ["empirical", "sampled", "exact"]
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def assert_matches(got, want, rtol=1e-4, atol=1e-9):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert tuple(g.shape) == w.shape          # sizes before values
        assert g.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=atol)


def reference(model, x, y, loss, kind, num_samples=3, seed=7, batch_size=4):
    return reference_fisher_of(model, x, y, loss=loss, kind=kind, num_samples=num_samples,
                               seed=seed, batch_size=batch_size)


@pytest.fixture(scope="module", params=["mlp", "branched"])
def problem(request):
    keras.utils.set_random_seed(0)
    model = mlp() if request.param == "mlp" else branched()
    x, y = data()
    refs = {kind: reference(model, x, y, LOGITS, kind) for kind in KINDS}
    return model, x, y, refs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_kind_matches_float64_reference(problem, method, kind):
    model, x, y, refs = problem
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind=kind, method=method,
                                  batch_size=4, num_samples=3, seed=7)
    assert_matches(got, refs[kind])


@pytest.mark.parametrize("loss,out_activation", [
    ("sparse_categorical_crossentropy", "softmax"),
    ("categorical_crossentropy", "softmax"),
    (keras.losses.CategoricalCrossentropy(from_logits=True), None),
    (keras.losses.BinaryCrossentropy(from_logits=True), None),
    ("binary_crossentropy", "sigmoid"),
    ("mse", None),
])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
# vmap repeats the factored engine's check: each loss enters through the same likelihood.
@pytest.mark.parametrize("method", ["factored", pytest.param("vmap", marks=pytest.mark.slow)])
def test_losses_match_reference(loss, out_activation, kind, method):
    classes = 3
    model = mlp(classes=classes, out_activation=out_activation)
    x, ids = data(n=9, classes=classes)
    name = loss if isinstance(loss, str) else type(loss).__name__
    if "binary" in name.lower():
        y = np.random.default_rng(1).integers(0, 2, size=(9, classes)).astype(np.float32)
    elif name == "mse":
        y = np.random.default_rng(1).normal(size=(9, classes)).astype(np.float32)
    elif "sparse" in name.lower():
        y = ids
    else:
        y = np.eye(classes, dtype=np.float32)[ids]
    want = reference_fisher(float64_twin(model), x, y, loss=loss, kind=kind)
    got = fastewc.fisher_diagonal(model, (x, y), loss=loss, kind=kind, method=method, batch_size=4)
    assert_matches(got, want)


def test_sampled_converges_to_exact():
    model = mlp()
    x, y = data(n=6)
    exact = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="factored")
    draws = 4000
    sampled = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="sampled", method="factored",
                                      num_samples=draws, seed=3)
    # Monte Carlo: the relative error of the total falls like 1/sqrt(draws·N); 0.05 is >5 sigma.
    for e, s in zip(exact, sampled):
        assert abs(float(tf.reduce_sum(s)) / float(tf.reduce_sum(e)) - 1.0) < 0.05
    few = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="sampled", method="factored",
                                  num_samples=1, seed=3)
    err_many = sum(float(tf.reduce_sum(tf.abs(s - e))) for s, e in zip(sampled, exact))
    err_few = sum(float(tf.reduce_sum(tf.abs(s - e))) for s, e in zip(few, exact))
    assert err_many < err_few


def test_sampled_is_reproducible_for_a_seed():
    model = mlp()
    x, y = data()
    a = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="sampled", seed=11, batch_size=5)
    b = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="sampled", seed=11, batch_size=5)
    c = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="sampled", seed=12, batch_size=5)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    assert any(not np.array_equal(u.numpy(), w.numpy()) for u, w in zip(a, c))


@pytest.mark.parametrize("batch_size", [1, 2, 7, 256])
def test_batch_sizes_give_the_mean_over_all_examples(batch_size):
    model = mlp()
    x, y = data(n=13)        # 13 is not a multiple of 2 or 7
    want = reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="exact")
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="factored",
                                  batch_size=batch_size)
    assert_matches(got, want)
    assert all(bool(tf.reduce_all(g >= 0)) for g in got)


def test_not_the_square_of_the_batch_mean_gradient():
    model = mlp()
    x, y = data(n=16)
    got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="empirical", batch_size=16)
    with tf.GradientTape() as tape:
        mean_loss = tf.reduce_mean(LOGITS(y, model(x), ))
    batched = [tf.square(g) for g in tape.gradient(mean_loss, model.trainable_variables)]
    assert float(tf.reduce_sum(got[0])) > 2.0 * float(tf.reduce_sum(batched[0]))


def test_dataset_input_matches_arrays_and_streams_without_retrace():
    model = mlp()
    x, y = data(n=23)
    want = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", batch_size=8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)   # batches of 5 rebatched to 8
    got = fastewc.fisher_diagonal(model, ds, loss=LOGITS, kind="exact", batch_size=8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5)
    # 3 batches of 8 (the last one partial) went through one trace.
    assert fisher_lib.tracing_count(model) == 1


@pytest.mark.parametrize("method", ["factored", "vmap", "jacobian"])
def test_repeated_calls_reuse_the_compiled_function(method):
    model = mlp()
    x, y = data(n=11)
    for _ in range(3):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method, batch_size=4)
    model.layers[0].kernel.assign_add(tf.ones_like(model.layers[0].kernel))   # new weights, same graph
    fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method, batch_size=4)
    assert fisher_lib.tracing_count(model) == 1


@pytest.mark.parametrize("method", ["factored", "vmap"])
def test_xla_and_tf_function_agree(method):
    model = branched()
    x, y = data()
    plain = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method, jit_compile=False)
    xla = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method, jit_compile=True)
    eager = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="loop")
    for p, q, r in zip(plain, xla, eager):
        np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(r.numpy(), p.numpy(), rtol=1e-5, atol=1e-9)


class Subclassed(keras.Model):
    def __init__(self, dtype=None):
        super().__init__(dtype=dtype)
        self.hidden = keras.layers.Dense(8, activation="tanh", dtype=dtype)
        self.drop = keras.layers.Dropout(0.3, dtype=dtype)
        self.out = keras.layers.Dense(4, dtype=dtype)

    def call(self, x, training=False):
        return self.out(self.drop(self.hidden(x), training=training))


def test_subclassed_model():
    keras.utils.set_random_seed(3)
    model, twin = Subclassed(), Subclassed(dtype="float64")
    x, y = data(classes=4)
    model(x[:1]), twin(x[:1].astype(np.float64))
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    want = reference_fisher(twin, x, y, loss=LOGITS, kind="exact")
    assert_matches(fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact"), want)


def test_auto_reports_its_choice(capsys):
    model = mlp()
    x, y = data()
    fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, verbose=1)
    printed = capsys.readouterr().out
    assert "method='auto' -> 'factored'" in printed


@pytest.mark.parametrize("policy,rtol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 3e-2)])
def test_mixed_precision_gives_float32_fisher_close_to_float32(policy, rtol):
    x, y = data(n=32)
    keras.utils.set_random_seed(5)
    model32 = mlp()
    want = fastewc.fisher_diagonal(model32, (x, y), loss=LOGITS, kind="exact")
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(5)
        model16 = mlp()
        model16.set_weights(model32.get_weights())
        for method in ("factored", "vmap"):
            got = fastewc.fisher_diagonal(model16, (x, y), loss=LOGITS, kind="exact", method=method)
            for g, w in zip(got, want):
                assert g.dtype == tf.float32
                assert bool(tf.reduce_all(tf.math.is_finite(g)))
                # relative L2 error per variable: half-precision activations move single entries
                err = np.linalg.norm(g.numpy() - w.numpy()) / np.linalg.norm(w.numpy())
                assert err <= rtol
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_data_sets_of_different_small_sizes_share_one_compiled_function():
    """Task after task: 5, 7 and 8 examples all run as one padded batch of 8 rows."""
    model = mlp()
    for n in (5, 7, 8):
        x, y = data(n=n)
        got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="factored")
        assert_matches(got, reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="exact"))
    assert fisher_lib.tracing_count(model) == 1


def test_embedding_model_matches_float64_reference():
    """The reference densifies Embedding gradients (IndexedSlices) itself."""
    keras.utils.set_random_seed(2)
    def build(dtype=None):
        return keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(11, 4, dtype=dtype),
                                 keras.layers.Flatten(dtype=dtype), keras.layers.Dense(3, dtype=dtype)])
    model, twin = build(), build("float64")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, size=(9, 5)).astype(np.int32), rng.integers(0, 3, size=9)
    want = reference_fisher(twin, x, y, loss=LOGITS, kind="exact")
    for method in ("factored", "loop"):
        assert_matches(fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method=method), want)
