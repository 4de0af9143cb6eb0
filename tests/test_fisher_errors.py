"""Bad input to fisher_diagonal: clear errors naming the argument, expected and received."""
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.registry import get_rule

from conftest import data, mlp

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def model():
    return mlp()


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="fisher"), r"`kind` must be one of 'empirical', 'sampled', 'exact'. Received: kind='fisher'"),
    (dict(method="fast"), r"`method` must be one of .*Received: method='fast'"),
    (dict(batch_size=0), r"`batch_size` must be a positive integer. Received: batch_size=0"),
    (dict(num_samples=-2), r"`num_samples` must be a positive integer. Received: num_samples=-2"),
    (dict(seed=-1), r"`seed` must be None or an integer .* Received: seed=-1"),
    (dict(jit_compile="yes"), r"`jit_compile` must be None, True or False"),
    (dict(loss="hinge"), r"`loss` must be one of .*Received: loss='hinge'"),
    (dict(loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1)), r"label_smoothing=0.1 is not a log-likelihood"),
])
def test_bad_arguments(model, kwargs, match):
    x, y = data()
    kwargs = {"loss": LOGITS, **kwargs}
    with pytest.raises(ValueError, match=match):
        fastewc.fisher_diagonal(model, (x, y), **kwargs)


def test_labels_out_of_range(model):
    x, y = data()
    y[3] = 5
    with pytest.raises(ValueError, match=r"Labels must be class ids in \[0, 5\).*Received: labels in \[\d+, 5\]"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)


def test_one_hot_labels_for_a_sparse_loss(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"integer class ids of shape \(batch,\).*categorical_crossentropy"):
        fastewc.fisher_diagonal(model, (x, np.eye(5)[y]), loss=LOGITS)


def test_sparse_labels_for_a_one_hot_loss(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"one-hot rows of shape \(batch, 5\).*sparse_categorical_crossentropy"):
        fastewc.fisher_diagonal(model, (x, y), loss="categorical_crossentropy")


def test_empty_data(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"`data` is empty.*Received: 0 examples"):
        fastewc.fisher_diagonal(model, (x[:0], y[:0]), loss=LOGITS)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0)
    with pytest.raises(ValueError, match=r"`data` is empty"):
        fastewc.fisher_diagonal(model, empty, loss=LOGITS)


def test_x_and_y_of_different_lengths(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"same number of examples. Received: x with \[13\] rows and y with 12 rows"):
        fastewc.fisher_diagonal(model, (x, y[:-1]), loss=LOGITS)


def test_data_not_a_pair(model):
    x, _ = data()
    with pytest.raises(ValueError, match=r"`data` must be a tuple \(x, y\).*Received: data of type ndarray"):
        fastewc.fisher_diagonal(model, x, loss=LOGITS)


def test_unbuilt_model_and_no_variables():
    with pytest.raises(ValueError, match=r"is not built"):
        fastewc.fisher_diagonal(keras.Sequential([keras.layers.Dense(3)]), data(), loss=LOGITS)
    frozen = mlp()
    frozen.trainable = False
    with pytest.raises(ValueError, match=r"has no trainable variables"):
        fastewc.fisher_diagonal(frozen, data(), loss=LOGITS)


class Scale(keras.layers.Layer):
    """A layer with a weight and no factored rule."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def ruleless_model():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), Scale(), keras.layers.Dense(5)])


def test_factored_without_a_rule_warns_naming_the_layer_and_the_fix():
    assert get_rule(Scale()) is None
    with pytest.warns(UserWarning, match=r"no factored Fisher rule for 'scale.*' \(Scale\); the factored engine "
                                         r"takes its per-example gradients.*fastewc.register_rule\(Scale, rule\)"):
        fastewc.fisher_diagonal(ruleless_model(), data(), loss=LOGITS, method="factored")


def test_auto_without_a_rule_warns_once_naming_the_layer_and_takes_it_alone():
    model = ruleless_model()
    x, y = data()
    with pytest.warns(UserWarning, match=r"no factored Fisher rule for 'scale.*' \(Scale\); the factored engine"):
        auto = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)       # second time: silent
    loop = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, method="loop")
    for a, b in zip(auto, loop):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)


def test_bad_input_leaves_the_model_untouched(model):
    before = [w.copy() for w in model.get_weights()]
    x, y = data()
    y[0] = 99
    with pytest.raises(ValueError):
        fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, method="factored")
    assert "call" not in model.layers[0].__dict__          # no layer left patched
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_import_without_tensorflow_names_the_extras():
    code = "import sys; sys.modules['tensorflow'] = None; import fastewc"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "fastewc[tf-cpu]" in proc.stderr and "fastewc[cuda]" in proc.stderr


# That importing fastewc leaves TensorFlow uninitialized (users configure devices after their
# imports) and that a process's first tensor may be a Fisher batch's (``call_tensor``) is
# checked in test_distribute.py's subprocesses, which configure devices after importing fastewc.


def scale_rule(layer, inputs):
    """The README's custom-rule example, verbatim."""
    z = inputs * layer.w                      # what layer.call computes
    a = keras.ops.cast(inputs, "float32")

    def sum_sq(delta, weight):                # delta: (K, N, d), weight: (K, N)
        return [(layer.w, keras.ops.einsum("kn,knd->d", weight, (delta * a) ** 2))]
    return z, z, sum_sq                       # outputs, probe (whose δ we need), sum_sq


def test_readme_custom_rule_matches_the_float64_reference():
    from fastewc.testing import reference_fisher
    fastewc.register_rule(Scale, scale_rule)
    try:
        with pytest.raises(ValueError, match=r"already registered for Scale. Pass overwrite=True"):
            fastewc.register_rule(Scale, scale_rule)
        model = ruleless_model()
        twin = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, dtype="float64"),
                                 Scale(dtype="float64"), keras.layers.Dense(5, dtype="float64")])
        twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
        x, y = data()
        want = reference_fisher(twin, x, y, loss=LOGITS, kind="exact")
        got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact", method="factored")
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-9)
    finally:
        fastewc.unregister_rule(Scale)


def test_logits_passed_as_probabilities(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"from_logits=False, so the model must output probabilities.*"
                                         r"Received: model outputs in \[-"):
        fastewc.fisher_diagonal(model, (x, y), loss="sparse_categorical_crossentropy")


def test_a_model_that_gained_a_head_gets_a_fisher_for_every_variable():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh")])
    x, y = data(classes=8)
    assert len(fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)) == 2
    model.add(keras.layers.Dense(5))
    x, y = data(classes=5)
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS)
    assert [tuple(f.shape) for f in fisher] == [tuple(v.shape) for v in model.trainable_variables]


def _wide_head(classes):
    """Dense(4 -> classes) on logits: exact's closed form is known (below)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(classes)])
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    return model, x, np.arange(3, dtype=np.int32)


def _exact_dense_fisher(model, x):
    """exact for z = xW + b, p = softmax(z): Σ_c p_c (p − e_c)_j² = p_j (1 − p_j), so
    F_W = mean_n x_n² ⊗ p_n (1 − p_n), F_b = mean_n p_n (1 − p_n), in float64."""
    w, b = (np.asarray(v, np.float64) for v in model.get_weights())
    z = x.astype(np.float64) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v = p * (1 - p)
    return [np.einsum("ni,nj->ij", x.astype(np.float64) ** 2, v) / len(x), v.mean(0)]


def test_exact_on_1000_classes_is_refused_before_any_work_unless_allowed():
    """1000 classes from logits: K = 999 backward passes per example, above the default
    limit (256): refused from the plan, state untouched, naming sampled and the setting;
    10 classes run; set_max_exact_cotangents(999) lets 1000 run (closed form above)."""
    assert fastewc.max_exact_cotangents() == 256
    model, x, y = _wide_head(1000)
    ewc = fastewc.EWC(model, lam=1.0)
    with pytest.raises(ValueError, match=r"`kind`='exact' needs 999 backward passes per example for a model output "
                                         r"of shape \(batch, 1000\), more than the limit of 256 .*nothing was computed"
                                         r".*Use kind='sampled'.*fastewc.set_max_exact_cotangents\(999\)"):
        ewc.consolidate((x, y), loss=LOGITS)
    assert ewc.num_tasks == 0
    small, xs, ys = _wide_head(10)
    for got, want in zip(fastewc.fisher_diagonal(small, (xs, ys), loss=LOGITS, kind="exact"),
                         _exact_dense_fisher(small, xs)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"`max_exact_cotangents` must be an integer >= 1 .*"
                                         r"Received: max_exact_cotangents=0"):
        fastewc.set_max_exact_cotangents(0)
    assert fastewc.max_exact_cotangents() == 256
    try:
        fastewc.set_max_exact_cotangents(999)
        got = fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind="exact")
    finally:
        fastewc.set_max_exact_cotangents(256)
    for g, want in zip(got, _exact_dense_fisher(model, x)):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-4, atol=1e-9)
