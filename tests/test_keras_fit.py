"""EWCModel: model.compile / model.fit with the analytic EWC gradient."""
import keras
import numpy as np
import pytest

import fastewc

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def _data(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n).astype("int32")


def _setup(dtype=None):
    """A model with an EWC consolidated on task A, then moved away from its anchor."""
    model = _mlp(dtype=dtype)
    x, y = _data(20, seed=5)
    ewc = fastewc.EWC(model, lam=5.0)
    ewc.consolidate((x, y), loss=LOSS, batch_size=10)
    for v in model.trainable_variables:
        v.assign(v + 0.1)
    return model, ewc


def _custom_step_run(x, y, batch, dtype=None):
    model, ewc = _setup(dtype)
    step = fastewc.make_train_step(model, keras.optimizers.Adam(0.01), LOSS, ewc=ewc, jit_compile=False)
    losses = [float(step(x[i:i + batch], y[i:i + batch])) for i in range(0, len(x), batch)]
    return model, losses


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((batch, dict(logs)))


@pytest.mark.parametrize("jit,spe", [(True, 3), (False, 1)])
def test_fit_matches_custom_step(jit, spe):
    """Same seed, data and batches: fit (jit_compile, steps_per_execution, callbacks) gives the
    weights of make_train_step within 1e-6 (measured: identical), and its logged loss is the
    mean of the step's returned values (data loss + penalty)."""
    x, y = _data(40)
    ref_model, ref_losses = _custom_step_run(x, y, 8)
    model, ewc = _setup()
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, metrics=["accuracy"],
                    jit_compile=jit, steps_per_execution=spe)
    recorder = _Recorder()
    history = wrapped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                          callbacks=[recorder, keras.callbacks.History()])
    for a, b in zip(model.trainable_variables, ref_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    np.testing.assert_allclose(history.history["loss"][0], np.mean(ref_losses), rtol=1e-5)
    assert history.history["ewc_penalty"][0] > 0
    assert "accuracy" in history.history
    # Keras calls batch callbacks once per execution of steps_per_execution batches
    assert len(recorder.batches) == -(-5 // spe)
    assert all("ewc_penalty" in logs and "loss" in logs for _, logs in recorder.batches)


def test_consolidation_between_fits_needs_no_recompile():
    x, y = _data(32)
    model = _mlp()
    ewc = fastewc.EWC(model, lam=10.0)
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer="sgd", loss=LOSS, jit_compile=True)
    first = wrapped.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert first.history["ewc_penalty"][0] == 0.0        # nothing consolidated yet
    function = wrapped.train_function
    ewc.consolidate((x, y), loss=LOSS)
    for v in model.trainable_variables:
        v.assign(v + 0.2)
    second = wrapped.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert second.history["ewc_penalty"][0] > 0
    assert wrapped.train_function is function
    # evaluate is Keras' own: the data loss, no penalty
    evaluated = wrapped.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(evaluated, float(LOSS(y, model(x))), rtol=1e-5)


def test_fit_mixed_float16_uses_loss_scaling_and_matches_custom_step():
    x, y = _data(24)
    ref_model, _ = _custom_step_run(x, y, 8, dtype="mixed_float16")
    model, ewc = _setup("mixed_float16")
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=False)
    wrapped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert isinstance(wrapped.optimizer, keras.optimizers.LossScaleOptimizer)
    for a, b in zip(model.trainable_variables, ref_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_bad_arguments():
    model, ewc = _setup()
    with pytest.raises(TypeError, match=r"`model` must be a Keras model"):
        fastewc.EWCModel(object(), ewc)
    with pytest.raises(ValueError, match=r"is not built"):
        fastewc.EWCModel(keras.Sequential([keras.layers.Dense(2)]), ewc)
    with pytest.raises(TypeError, match=r"`ewc` must be a fastewc.EWC"):
        fastewc.EWCModel(model, None)
    with pytest.raises(ValueError, match=r"`ewc` was built on model"):
        fastewc.EWCModel(_mlp(seed=3), ewc)


def test_fit_with_kfac_matches_custom_step_and_penalizes_new_terms():
    """curvature="kfac": fit (XLA) gives the weights of make_train_step, and after a second
    consolidation (a second Kronecker term per layer) the next fit's first logged penalty
    is the EWC's penalty with both terms."""
    def setup():
        model = _mlp()
        x_a, y_a = _data(20, seed=5)
        ewc = fastewc.EWC(model, lam=5.0, curvature="kfac")
        ewc.consolidate((x_a, y_a), loss=LOSS)
        for v in model.trainable_variables:
            v.assign(v + 0.1)
        return model, ewc

    x, y = _data(40)
    ref_model, ref_ewc = setup()
    step = fastewc.make_train_step(ref_model, keras.optimizers.Adam(0.01), LOSS, ewc=ref_ewc, jit_compile=False)
    for i in range(0, 40, 8):
        step(x[i:i + 8], y[i:i + 8])
    model, ewc = setup()
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=True)
    wrapped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.trainable_variables, ref_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    ewc.consolidate((x, y), loss=LOSS)
    for v in model.trainable_variables:
        v.assign(v - 0.2)
    expected = float(ewc.penalty())
    recorder = _Recorder()
    wrapped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    np.testing.assert_allclose(recorder.batches[0][1]["ewc_penalty"], expected, rtol=1e-5)
