"""make_train_step: the analytic EWC gradient, steps_per_call, no retracing, mixed precision."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import train as train_lib

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(seed=0, dtype=None, din=6, hidden=8, classes=3, regularizer=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((din,)),
        keras.layers.Dense(hidden, activation="tanh", dtype=dtype, kernel_regularizer=regularizer),
        keras.layers.Dense(classes, dtype=dtype),
    ])


def _data(n=24, din=6, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, din)).astype("float32"), rng.integers(0, classes, n).astype("int32")


def _ewc(model, lam=4.0, seed=2):
    """An EWC with a known random state (F, θ*) and the weights moved away from θ*."""
    rng = np.random.default_rng(seed)
    ewc = fastewc.EWC(model, lam=lam)
    fisher = [rng.uniform(0, 1, v.shape).astype("float32") for v in model.trainable_variables]
    anchors = [v.numpy() + rng.normal(0, 0.3, v.shape).astype("float32") for v in model.trainable_variables]
    ewc.add_task(fisher, anchors)
    return ewc


def _weights(model):
    return [v.numpy().astype("float64") for v in model.trainable_variables]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _eager_reference_step(model, optimizer, x, y, ewc=None):
    """The usual eager step: one tape over data loss + the penalty (autodiff through it)."""
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
        if model.losses:
            loss = loss + tf.add_n(model.losses)
        if ewc is not None:
            loss = loss + ewc.penalty()
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    return float(loss)


# -- values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("with_ewc", [False, True])
def test_step_matches_eager_tape_reference(jit, with_ewc):
    x, y = _data()
    ref_model = _mlp(regularizer=keras.regularizers.L2(1e-2))
    ref_ewc = _ewc(ref_model) if with_ewc else None
    ref_opt = keras.optimizers.Adam(0.05)
    model = _mlp(regularizer=keras.regularizers.L2(1e-2))
    ewc = _ewc(model) if with_ewc else None
    step = fastewc.make_train_step(model, keras.optimizers.Adam(0.05), LOSS, ewc=ewc, jit_compile=jit)
    for start in (0, 8, 16):
        expected = _eager_reference_step(ref_model, ref_opt, x[start:start + 8], y[start:start + 8], ref_ewc)
        got = step(x[start:start + 8], y[start:start + 8])
        assert got.shape == () and got.dtype == tf.float32
        # returned value = data loss + model.losses + penalty, before the update
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert _max_diff(_weights(model), _weights(ref_model)) < 1e-5


def test_penalty_gradient_is_added_not_taped():
    """With lam large and SGD(lr=1), the update is exactly data grad + λA(θ−μ)."""
    x, y = _data(8)
    model = _mlp()
    ewc = _ewc(model, lam=50.0)
    before = _weights(model)
    with tf.GradientTape() as tape:
        data = LOSS(y, model(x, training=True))
    data_grads = tape.gradient(data, model.trainable_variables)
    pen_grads = ewc.penalty_gradients()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(1.0), LOSS, ewc=ewc, jit_compile=False)
    step(x, y)
    for b, a, g, p in zip(before, _weights(model), data_grads, pen_grads):
        np.testing.assert_allclose(b - a, g.numpy() + p.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("inactive", ["no task yet", "lam 0"])
def test_inactive_penalty_trains_like_no_ewc_and_wakes_up_after_a_task(jit, inactive):
    """Before the first task (or with λ = 0) the penalty branch is skipped: the same
    weights as a step without EWC.  A consolidation (or λ > 0) later switches it on in the
    same compiled step (no retrace), matching the eager tape reference."""
    x, y = _data()
    plain = _mlp()
    model = _mlp()
    ewc = fastewc.EWC(model, lam=4.0) if inactive == "no task yet" else _ewc(model, lam=0.0)
    assert not bool(ewc.penalty_is_active())
    plain_step = fastewc.make_train_step(plain, keras.optimizers.Adam(0.05), LOSS, jit_compile=jit)
    step = fastewc.make_train_step(model, keras.optimizers.Adam(0.05), LOSS, ewc=ewc, jit_compile=jit)
    for start in (0, 8):
        np.testing.assert_allclose(float(step(x[start:start + 8], y[start:start + 8])),
                                   float(plain_step(x[start:start + 8], y[start:start + 8])), rtol=1e-6)
    assert _max_diff(_weights(model), _weights(plain)) < 1e-6

    # switch it on: the eager reference continues from the same weights and optimizer state
    ref_model = _mlp()
    ref_model.set_weights(model.get_weights())
    if inactive == "no task yet":
        rng = np.random.default_rng(5)
        fisher = [rng.uniform(0, 1, v.shape).astype("float32") for v in model.trainable_variables]
        anchors = [v.numpy() + rng.normal(0, 0.3, v.shape).astype("float32")
                   for v in model.trainable_variables]
        ewc.add_task(fisher, anchors)
    else:
        ewc.lam = 4.0
    assert bool(ewc.penalty_is_active())
    ref_ewc = fastewc.EWC(ref_model, lam=4.0)
    ref_ewc.add_task(*zip(*[(ewc.state()[k][0], ewc.state()[k][1]) for k in ewc.tracked_paths]))
    ref_opt = keras.optimizers.Adam(0.05)
    ref_opt.build(ref_model.trainable_variables)
    for src, dst in zip(step.optimizer.variables, ref_opt.variables):
        dst.assign(src)
    traces = step.tracing_count()
    expected = _eager_reference_step(ref_model, ref_opt, x[16:], y[16:], ref_ewc)
    np.testing.assert_allclose(float(step(x[16:], y[16:])), expected, rtol=1e-5)
    assert _max_diff(_weights(model), _weights(ref_model)) < 1e-5
    assert step.tracing_count() == traces


@pytest.mark.parametrize("jit", [False, True])
def test_steps_per_call_equals_k_single_steps(jit):
    x, y = _data(24)
    k = 3
    single = _mlp()
    ewc1 = _ewc(single)
    step1 = fastewc.make_train_step(single, keras.optimizers.Adam(0.05), LOSS, ewc=ewc1, jit_compile=jit)
    expected = [float(step1(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])) for i in range(k)]
    multi = _mlp()
    ewc3 = _ewc(multi)
    step3 = fastewc.make_train_step(multi, keras.optimizers.Adam(0.05), LOSS, ewc=ewc3,
                                    jit_compile=jit, steps_per_call=k)
    losses = step3(x.reshape(k, 8, -1), y.reshape(k, 8))
    assert losses.shape == (k,)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)
    assert _max_diff(_weights(single), _weights(multi)) < 1e-5


def test_sample_weight_and_string_loss():
    x, y = _data(8)
    sw = np.linspace(0.0, 2.0, 8).astype("float32")
    ref = _mlp()
    ref_opt = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, ref(x), sample_weight=sw)
    ref_opt.apply(tape.gradient(loss, ref.trainable_variables), ref.trainable_variables)
    model = _mlp()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, jit_compile=True)
    np.testing.assert_allclose(float(step(x, y, sample_weight=sw)), float(loss), rtol=1e-5)
    assert _max_diff(_weights(ref), _weights(model)) < 1e-6
    # a loss name: the Keras function with the default mean reduction
    model2 = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    step2 = fastewc.make_train_step(model2, "sgd", "sparse_categorical_crossentropy")
    expected = float(keras.losses.sparse_categorical_crossentropy(y, model2(x)).numpy().mean())
    np.testing.assert_allclose(float(step2(x, y)), expected, rtol=1e-5)


# -- tracing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_no_retrace_on_partial_batch_or_new_batch_size(jit, k):
    model = _mlp()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.01), LOSS, ewc=_ewc(model),
                                   jit_compile=jit, steps_per_call=k)
    x, y = _data(64)
    shape = (lambda t, b: t[:b]) if k == 1 else (lambda t, b: np.stack([t[:b], t[b:2 * b]]))
    for b in (16, 16, 16, 5, 16, 32, 7, 32, 1):
        step(shape(x, b), shape(y, b))
    assert step.tracing_count() == 1


def test_name_scope_in_graph():
    model = _mlp()
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.01), LOSS, ewc=_ewc(model), jit_compile=False)
    x, y = _data(4)
    step(x, y)
    graph = step._function.get_concrete_function(
        tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int32), None).graph
    names = [op.name for op in graph.get_operations()]
    assert any(name.startswith("fastewc/train_step/") for name in names)


def test_default_jit_compile_by_model():
    dense = _mlp()
    conv = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                             keras.layers.Dense(2)])
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert train_lib.default_jit_compile(dense) is True
    assert train_lib.default_jit_compile(conv) is gpu
    assert fastewc.make_train_step(conv, "sgd", LOSS).jit_compile is gpu
    if not gpu:
        with pytest.warns(UserWarning, match=r"XLA's CPU convolutions inside the step loop"):
            fastewc.make_train_step(conv, "sgd", LOSS, jit_compile=True, steps_per_call=2)


# -- argument errors -------------------------------------------------------------------------
def test_bad_arguments_raise_keras_style_errors():
    model = _mlp()
    opt = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match=r"`steps_per_call` must be a positive integer. Received: steps_per_call=0"):
        fastewc.make_train_step(model, opt, LOSS, steps_per_call=0)
    with pytest.raises(ValueError, match=r"steps_per_call=2.5"):
        fastewc.make_train_step(model, opt, LOSS, steps_per_call=2.5)
    with pytest.raises(ValueError, match=r"`jit_compile` must be None, True or False. Received: jit_compile='yes'"):
        fastewc.make_train_step(model, opt, LOSS, jit_compile="yes")
    with pytest.raises(TypeError, match=r"`model` must be a Keras model"):
        fastewc.make_train_step(object(), opt, LOSS)
    with pytest.raises(ValueError, match=r"is not built"):
        fastewc.make_train_step(keras.Sequential([keras.layers.Dense(2)]), opt, LOSS)
    with pytest.raises(TypeError, match=r"`optimizer` must be a Keras 3 optimizer"):
        fastewc.make_train_step(model, object(), LOSS)
    with pytest.raises(ValueError, match=r"`loss` must be a Keras loss name"):
        fastewc.make_train_step(model, opt, "no_such_loss")
    with pytest.raises(ValueError, match=r"`loss` must reduce to a scalar"):
        fastewc.make_train_step(model, opt, keras.losses.MeanSquaredError(reduction="none"))
    with pytest.raises(TypeError, match=r"`ewc` must be None or a fastewc.EWC"):
        fastewc.make_train_step(model, opt, LOSS, ewc="ewc")
    other = _mlp(seed=3)
    with pytest.raises(ValueError, match=r"`ewc` was built on model"):
        fastewc.make_train_step(model, opt, LOSS, ewc=fastewc.EWC(other, lam=1.0))

    x, y = _data(8)
    step3 = fastewc.make_train_step(model, opt, LOSS, steps_per_call=3)
    with pytest.raises(ValueError, match=r"must stack steps_per_call=3 batches.*leading dimension 2"):
        step3(np.stack([x, x]), np.stack([y, y]))
    with pytest.raises(ValueError, match=r"must have shape \(steps_per_call=3, batch, \.\.\.\)"):
        step3(x[0], y)
    step1 = fastewc.make_train_step(model, opt, LOSS)
    with pytest.raises(ValueError, match=r"same batch size. Received batch sizes x: 8, y: 5"):
        step1(x, y[:5])
    with pytest.raises(ValueError, match=r"The batch is empty"):
        step1(x[:0], y[:0])


# -- mixed precision ---------------------------------------------------------------------------
def test_mixed_float16_wraps_optimizer_and_bfloat16_does_not():
    step = fastewc.make_train_step(_mlp(dtype="mixed_float16"), keras.optimizers.SGD(0.1), LOSS)
    assert isinstance(step.optimizer, keras.optimizers.LossScaleOptimizer)
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    assert fastewc.make_train_step(_mlp(dtype="mixed_float16"), lso, LOSS).optimizer is lso
    step = fastewc.make_train_step(_mlp(dtype="mixed_bfloat16"), keras.optimizers.SGD(0.1), LOSS)
    assert not isinstance(step.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _data(8)
    assert np.isfinite(float(step(x, y)))


def _tiny_gradient_problem(dtype):
    """A linear model whose true kernel gradient (2e-8) underflows in float16."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False, dtype=dtype,
                                                                     kernel_initializer="ones")])
    x = np.full((8, 4), 1e-4, np.float32)
    y = np.full((8, 1), 4e-4 + 1e-4, np.float32)   # residual -1e-4 per example
    return model, x, y


@pytest.mark.parametrize("jit", [False, True])
def test_float16_small_gradients_are_not_flushed(jit):
    ref, x, y = _tiny_gradient_problem("float32")
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, ref(x))
    true_grad = tape.gradient(loss, ref.trainable_variables)[0].numpy()
    # below half of float16's smallest subnormal (6e-8): rounds to 0 in float16
    assert 1e-8 < np.abs(true_grad).min() and np.abs(true_grad).max() < 3e-8
    # without loss scaling the float16 backward pass flushes it to zero ...
    unscaled, _, _ = _tiny_gradient_problem("mixed_float16")
    with tf.GradientTape() as tape:
        loss16 = keras.losses.MeanSquaredError()(y, unscaled(x))
    assert np.all(tape.gradient(loss16, unscaled.trainable_variables)[0].numpy() == 0)
    # ... with the step's dynamic loss scaling it survives (SGD: update = -lr·grad; lr=1e4
    # makes the update representable next to a weight of 1 in float32)
    model, _, _ = _tiny_gradient_problem("mixed_float16")
    step = fastewc.make_train_step(model, keras.optimizers.SGD(1e4), "mse", jit_compile=jit)
    step(x, y)
    update = (1.0 - model.trainable_variables[0].numpy()) / 1e4
    np.testing.assert_allclose(update, true_grad, rtol=1e-2)


@pytest.mark.parametrize("jit", [False, True])
def test_float16_overflow_step_is_skipped_and_scale_drops(jit):
    model = _mlp(dtype="mixed_float16")
    ewc = _ewc(model)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, ewc=ewc, jit_compile=jit)
    scale0 = float(step.optimizer.dynamic_scale.numpy())
    before = _weights(model)
    x, y = _data(8)
    value = step(x * 1e5, y)       # float16 activations overflow: non-finite gradients
    assert not np.isfinite(float(value))
    assert _max_diff(before, _weights(model)) == 0.0
    assert float(step.optimizer.dynamic_scale.numpy()) == scale0 / 2
    assert int(step.optimizer.iterations.numpy()) == 0
    step(x, y)                      # a finite step then goes through
    assert _max_diff(before, _weights(model)) > 0
    assert int(step.optimizer.iterations.numpy()) == 1


def test_float16_penalty_gradient_added_unscaled():
    """λ large: the update is dominated by λA(θ−μ); a penalty gradient not multiplied by the
    loss scale (or divided twice) would be off by 2^15."""
    x, y = _data(8)
    m32, m16 = _mlp(), _mlp(dtype="mixed_float16")
    e32, e16 = _ewc(m32, lam=100.0), _ewc(m16, lam=100.0)
    s32 = fastewc.make_train_step(m32, keras.optimizers.SGD(1e-3), LOSS, ewc=e32, jit_compile=True)
    s16 = fastewc.make_train_step(m16, keras.optimizers.SGD(1e-3), LOSS, ewc=e16, jit_compile=True)
    before = _weights(m32)
    l32, l16 = float(s32(x, y)), float(s16(x, y))
    np.testing.assert_allclose(l16, l32, rtol=1e-4)
    d32 = [b - a for b, a in zip(before, _weights(m32))]
    d16 = [b - a for b, a in zip(before, _weights(m16))]
    for a, b in zip(d16, d32):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)   # measured: rtol 2e-4


def test_float16_training_close_to_float32():
    """5 Adam steps (lr 1e-2) with EWC: mixed_float16 weights within 2e-4 of float32 and
    losses within rtol 1e-4 (measured: 2.5e-5 and 1.4e-5)."""
    x, y = _data(40)
    m32, m16 = _mlp(hidden=16), _mlp(hidden=16, dtype="mixed_float16")
    s32 = fastewc.make_train_step(m32, keras.optimizers.Adam(1e-2), LOSS, ewc=_ewc(m32))
    s16 = fastewc.make_train_step(m16, keras.optimizers.Adam(1e-2), LOSS, ewc=_ewc(m16))
    for i in range(5):
        l32 = float(s32(x[8 * i:8 * (i + 1)], y[8 * i:8 * (i + 1)]))
        l16 = float(s16(x[8 * i:8 * (i + 1)], y[8 * i:8 * (i + 1)]))
        np.testing.assert_allclose(l16, l32, rtol=1e-4)
    assert _max_diff(_weights(m32), _weights(m16)) < 2e-4


def test_ewc_made_before_the_model_was_built_is_picked_up_after_consolidation():
    """The EWC starts tracking the variables at its first consolidation: the step retraces
    once and then includes the penalty."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    ewc = fastewc.EWC(model, lam=10.0)
    x, y = _data(16)
    model(x[:1])
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, ewc=ewc)
    expected = float(LOSS(y[:8], model(x[:8])))
    np.testing.assert_allclose(float(step(x[:8], y[:8])), expected, rtol=1e-5)   # no penalty yet
    ewc.consolidate((x, y), loss=LOSS)
    for v in model.trainable_variables:
        v.assign(v + 0.3)
    expected = float(LOSS(y[8:], model(x[8:]))) + float(ewc.penalty())
    assert float(ewc.penalty()) > 0
    np.testing.assert_allclose(float(step(x[8:], y[8:])), expected, rtol=1e-5)
    assert step.tracing_count() == 2


@pytest.mark.parametrize("jit", [False, True])
def test_stop_on_nonfinite_skips_the_bad_step_and_raises(jit):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = keras.optimizers.Adam(0.1)
    step = fastewc.make_train_step(model, optimizer, "mse", jit_compile=jit, stop_on_nonfinite=True)
    x = np.ones((2, 4), np.float32)
    y = np.zeros((2, 3), np.float32)
    step(x, y)
    before = [w.copy() for w in model.get_weights()]
    iterations = int(optimizer.iterations.numpy())
    with pytest.raises(FloatingPointError, match=r"non-finite \(nan\) at this step.*not applied"):
        step(np.full((2, 4), np.nan, np.float32), y)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.iterations.numpy()) == iterations


def test_stop_on_nonfinite_in_a_multi_step_call_keeps_the_steps_before():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), "mse", steps_per_call=3,
                                   stop_on_nonfinite=True)
    xs = np.ones((3, 2, 4), np.float32)
    xs[1] = np.nan
    ys = np.zeros((3, 2, 3), np.float32)
    with pytest.raises(FloatingPointError, match=r"at step 1 of this call \(3 steps\)"):
        step(xs, ys)
    # Only step 0 was applied: one plain SGD step from the same start.
    one = fastewc.make_train_step(reference, keras.optimizers.SGD(0.1), "mse")
    one(xs[0], ys[0])
    for a, b in zip(reference.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stop_on_nonfinite_must_be_a_bool():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"`stop_on_nonfinite` must be True or False. Received: stop_on_nonfinite='yes'"):
        fastewc.make_train_step(model, "sgd", "mse", stop_on_nonfinite="yes")


# -- TrainStep checks its own arguments ---------------------------------------------------------
def _one_device_mlp():
    """An MLP, its optimizer and its strategy, built in a OneDeviceStrategy's scope."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = _mlp()
        optimizer = keras.optimizers.SGD(0.1)
    return model, optimizer, strategy


def test_trainstep_refuses_at_construction_what_could_not_run():
    model, optimizer, strategy = _one_device_mlp()
    # Used to build, then fail at the first call: "<lambda>() got an unexpected keyword argument 'ok'".
    with pytest.raises(ValueError, match=r"`stop_on_nonfinite=True` is not supported under "
                                         r"tf.distribute.*Received: a model built in OneDeviceStrategy"):
        train_lib.TrainStep(model, optimizer, LOSS, strategy=strategy, steps_per_call=2,
                            stop_on_nonfinite=True)
    plain = _mlp()
    with pytest.raises(ValueError, match=r"`strategy` must be None or the tf.distribute strategy "
                                         r"`model` '.*' was built in \(no strategy scope.*Received: "
                                         r"strategy=OneDeviceStrategy"):
        train_lib.TrainStep(plain, "sgd", LOSS, strategy=strategy)
    with pytest.raises(ValueError, match=r"`strategy` must be None or a tf.distribute.Strategy. "
                                         r"Received: strategy of type str"):
        train_lib.TrainStep(plain, "sgd", LOSS, strategy="mirrored")
    for kwargs, message in [
            ({"steps_per_call": 0}, r"`steps_per_call` must be a positive integer. Received: steps_per_call=0"),
            ({"jit_compile": "yes"}, r"`jit_compile` must be None, True or False. Received: jit_compile='yes'"),
            ({"stop_on_nonfinite": None}, r"`stop_on_nonfinite` must be True or False. Received: stop_on_nonfinite=None")]:
        with pytest.raises(ValueError, match=message):
            train_lib.TrainStep(plain, "sgd", LOSS, **kwargs)
    with pytest.raises(TypeError, match=r"`ewc` must be None or a fastewc.EWC"):
        train_lib.TrainStep(plain, "sgd", LOSS, ewc=object())


def test_trainstep_built_directly_runs_every_valid_combination():
    x, y = _data(16)
    xs, ys = np.stack([x[:8], x[8:]]), np.stack([y[:8], y[8:]])
    # The default strategy stands for none: stop_on_nonfinite works, k = 2, same as make_train_step.
    model, reference = _mlp(), _mlp()
    direct = train_lib.TrainStep(model, keras.optimizers.SGD(0.1), LOSS, ewc=_ewc(model),
                                 strategy=tf.distribute.get_strategy(), steps_per_call=2,
                                 stop_on_nonfinite=True, jit_compile=False)
    assert direct.strategy is None and direct.stop_on_nonfinite is True
    wrapped = fastewc.make_train_step(reference, keras.optimizers.SGD(0.1), LOSS, ewc=_ewc(reference),
                                      steps_per_call=2, stop_on_nonfinite=True, jit_compile=False)
    np.testing.assert_allclose(direct(xs, ys).numpy(), wrapped(xs, ys).numpy(), rtol=1e-6)
    assert _max_diff(_weights(model), _weights(reference)) < 1e-6
    # Under a strategy (one replica): k = 1 and k = 2 through strategy.run, with and without XLA.
    for k, jit in ((1, False), (2, False), (2, True)):
        model, optimizer, strategy = _one_device_mlp()
        reference = _mlp()
        step = train_lib.TrainStep(model, optimizer, LOSS, ewc=_ewc(model), strategy=strategy,
                                   steps_per_call=k, jit_compile=jit)
        assert step.strategy is strategy
        plain = fastewc.make_train_step(reference, keras.optimizers.SGD(0.1), LOSS,
                                        ewc=_ewc(reference), steps_per_call=k, jit_compile=False)
        args = (xs, ys) if k == 2 else (x, y)
        np.testing.assert_allclose(step(*args).numpy(), plain(*args).numpy(), rtol=1e-5)
        assert _max_diff(_weights(model), _weights(reference)) < 1e-5


# -- the written contract ------------------------------------------------------------------------
class _Quadratic:
    """Not an EWC: P = λ/2 Σ (θ − 0)², written against the PenaltySource protocol only."""

    def __init__(self, model, lam):
        self.model, self.lam = model, lam

    @property
    def tracked_paths(self):
        return [v.path for v in self.model.trainable_variables]

    def penalty_is_active(self):
        return tf.constant(True)

    def penalty_and_gradients(self, *, inline=False):
        thetas = [tf.convert_to_tensor(v) for v in self.model.trainable_variables]
        value = 0.5 * self.lam * tf.add_n([tf.reduce_sum(tf.square(t)) for t in thetas])
        return value, [self.lam * t for t in thetas]


def test_any_penalty_source_trains_like_the_taped_penalty():
    from fastewc._penalty_term import PenaltySource

    assert isinstance(fastewc.EWC(_mlp(), lam=1.0), PenaltySource)
    model, reference = _mlp(), _mlp()
    source = _Quadratic(model, lam=0.3)
    assert isinstance(source, PenaltySource)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, ewc=source, jit_compile=True)
    x, y = _data(8)
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = LOSS(y, reference(x, training=True)) + 0.15 * tf.add_n(
            [tf.reduce_sum(tf.square(v)) for v in reference.trainable_variables])
    optimizer.apply(tape.gradient(loss, reference.trainable_variables), reference.trainable_variables)
    np.testing.assert_allclose(float(step(x, y)), float(loss), rtol=1e-5)
    assert _max_diff(_weights(model), _weights(reference)) < 1e-5


def test_layering_nothing_imports_upward():
    """keras_fit → train → _penalty_term; ewc → penalty; no module imports a trainer's or
    EWC's private name, and the contract module imports neither side."""
    import ast
    import pathlib

    root = pathlib.Path(fastewc.__file__).parent

    def imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastewc"):
                out |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("fastewc")}
        return out

    def touches(found, module):
        return any(f == f"fastewc.{module}" or f.startswith(f"fastewc.{module}.") for f in found)

    for lower, uppers in {"_penalty_term": ("ewc", "train", "keras_fit"), "ewc": ("train", "keras_fit"),
                          "ewc_file": ("ewc", "train", "keras_fit"), "penalty": ("ewc", "train", "keras_fit"),
                          "train": ("keras_fit", "ewc")}.items():
        found = imports(lower)
        assert not [u for u in uppers if touches(found, u)], (lower, found)
    for name in ("train", "keras_fit", "ewc", "penalty", "_penalty_term", "ewc_file"):
        found = imports(name)
        private = [f for f in found if f.rsplit(".", 1)[-1].startswith("_")
                   and not f.rsplit(".", 1)[-1].startswith("__")
                   and not f.split(".")[1].startswith("_")]   # private modules are internal by design
        assert not private, (name, private)
        assert "keras.src" not in (root / f"{name}.py").read_text(), name
