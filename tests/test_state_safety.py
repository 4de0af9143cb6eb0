"""State safety (issue 16): nothing lost under threads, checkpoints and saves; the state never
holds a non-finite value; evaluate reports the penalty; a changed `trainable` flag is named;
every damaged EWC file is reported as such.

Thread tests start their threads together on a barrier and assert only on the final state
(no timing).  References are float64 NumPy, independent of fastewc's merge.
"""
import os
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import ewc_file as ewc_file_lib
from fastewc import penalty as penalty_lib

from conftest import data, mlp, weights64

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
F32_MAX = float(np.finfo(np.float32).max)


def named_mlp(extra_head=False, built=True):
    layers = [keras.layers.Dense(8, activation="tanh", name="h"), keras.layers.Dense(5, name="out")]
    if extra_head:
        layers.append(keras.layers.Dense(3, name="extra"))
    return keras.Sequential(([keras.Input((6,))] if built else []) + layers)



def run_together(n, target):
    """``target(i)`` in n threads released together by a barrier; re-raise the first error."""
    barrier, errors = threading.Barrier(n), []

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as err:   # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def assert_state(ewc, model, a_want, mu_want, rtol=1e-6):
    state = ewc.state()
    for v, a, mu in zip(model.trainable_variables, a_want, mu_want):
        got_a, got_mu = state[v.path.split("/", 1)[1]]
        np.testing.assert_allclose(got_a, a, rtol=rtol, atol=0)
        np.testing.assert_allclose(got_mu, mu, rtol=rtol, atol=1e-7)


# -- 1. concurrent consolidations ---------------------------------------------------------
def test_concurrent_consolidations_each_enter_the_state():
    n = 6
    model = mlp()
    ewc = fastewc.EWC(model, lam=1.0)
    tasks = [data(n=16, seed=t) for t in range(n)]
    fishers = [None] * n

    def consolidate(i):
        fishers[i] = ewc.consolidate(tasks[i], loss=LOGITS, kind="empirical", jit_compile=False)

    run_together(n, consolidate)
    assert ewc.num_tasks == n
    theta = weights64(model)
    a_want = [sum(f[j].numpy().astype(np.float64) for f in fishers) for j in range(len(theta))]
    mu_want = [np.where(a > 0, sum(f[j].numpy().astype(np.float64) * theta[j] for f in fishers)
                        / np.where(a > 0, a, 1), theta[j]) for j, a in enumerate(a_want)]
    assert_state(ewc, model, a_want, mu_want)


def test_concurrent_add_task_equals_the_sequential_merge():
    n = 8
    model = mlp()
    ewc = fastewc.EWC(model, lam=2.0)
    rng = np.random.default_rng(0)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    fishers = [[rng.uniform(0, 1, s).astype(np.float32) for s in shapes] for _ in range(n)]
    anchors = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(n)]

    run_together(n, lambda i: ewc.add_task(fishers[i], anchors=anchors[i]))
    assert ewc.num_tasks == n
    f64 = [[f.astype(np.float64) for f in task] for task in fishers]
    t64 = [[t.astype(np.float64) for t in task] for task in anchors]
    a_want = [sum(task[j] for task in f64) for j in range(len(shapes))]
    mu_want = [sum(f[j] * t[j] for f, t in zip(f64, t64)) / a_want[j] for j in range(len(shapes))]
    assert_state(ewc, model, a_want, mu_want, rtol=2e-5)
    # The constant too: the penalty is the per-task sum at the current weights.
    theta = weights64(model)
    want = 0.5 * 2.0 * sum(float(np.sum(f[j] * (theta[j] - t[j]) ** 2))
                           for f, t in zip(f64, t64) for j in range(len(shapes)))
    np.testing.assert_allclose(float(ewc.penalty()), want, rtol=1e-5)


def test_a_save_during_concurrent_consolidations_is_one_consistent_snapshot(tmp_path):
    """Task t adds F = 2^t everywhere, so a file's A names the set of tasks it holds: its
    binary digits must be exactly `num_tasks` tasks, in every entry."""
    n = 6
    model = mlp()
    ewc = fastewc.EWC(model, lam=1.0)
    shapes = [tuple(v.shape) for v in model.trainable_variables]

    def work(i):
        if i < n:
            ewc.add_task([np.full(s, 2.0 ** i, np.float32) for s in shapes])
        else:
            for k in range(n):
                ewc.save(tmp_path / f"snap{k}.npz")

    run_together(n + 1, work)
    assert ewc.num_tasks == n
    for k in range(n):
        loaded = fastewc.EWC.load(tmp_path / f"snap{k}.npz", model)
        values = np.unique(np.concatenate([a.ravel() for a, _ in loaded.state().values()]))
        assert values.size == 1, values
        assert bin(int(values[0])).count("1") == loaded.num_tasks


# -- 2. tf.train.Checkpoint never defers EWC state ----------------------------------------
def saved_checkpoint(tmp_path, extra_head=False):
    model = named_mlp(extra_head=extra_head)
    ewc = fastewc.EWC(model, lam=3.0)
    rng = np.random.default_rng(1)
    ewc.add_task([rng.uniform(0, 1, v.shape).astype(np.float32) for v in model.trainable_variables])
    path = tf.train.Checkpoint(ewc=ewc).write(str(tmp_path / "ckpt"))
    return model, ewc, path


def test_checkpoint_read_into_an_unbuilt_model_raises_and_a_later_consolidate_stands(tmp_path):
    model, ewc, path = saved_checkpoint(tmp_path)
    model2 = named_mlp(built=False)
    ewc2 = fastewc.EWC(model2, lam=1.0)
    with pytest.raises(ValueError, match=r"Cannot restore the EWC state of variable 'h/kernel'.*"
                                         r"is not built.*Build the model first"):
        tf.train.Checkpoint(ewc=ewc2).read(path)
    assert (ewc2.num_tasks, ewc2.lam, ewc2.tracked_paths) == (0, 1.0, [])   # nothing assigned
    model2(np.zeros((1, 6), np.float32))                                    # build it now
    fisher = [np.full(v.shape, 0.5, np.float32) for v in model2.trainable_variables]
    ewc2.add_task(fisher)                    # no deferred restore may overwrite this task
    assert ewc2.num_tasks == 1
    assert_state(ewc2, model2, fisher, weights64(model2))


def test_checkpoint_read_after_building_restores_the_saved_state(tmp_path):
    model, ewc, path = saved_checkpoint(tmp_path)
    model2 = named_mlp(built=False)
    ewc2 = fastewc.EWC(model2, lam=1.0)       # made on the unbuilt model: tracks nothing yet
    model2(np.zeros((1, 6), np.float32))
    model2.set_weights(model.get_weights())
    tf.train.Checkpoint(ewc=ewc2).read(path).assert_consumed()
    assert (ewc2.num_tasks, ewc2.lam) == (1, 3.0)
    for (a, mu), (a2, mu2) in zip(ewc.state().values(), ewc2.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)
    assert float(ewc2.penalty()) == float(ewc.penalty())
    for v in model2.trainable_variables:
        v.assign_add(tf.ones_like(v))
    assert float(ewc2.penalty()) > 0
    ewc2.add_task([np.ones(v.shape, np.float32) for v in model2.trainable_variables])
    assert ewc2.num_tasks == 2
    for (a, _), (a2, _) in zip(ewc.state().values(), ewc2.state().values()):
        np.testing.assert_allclose(a2, a + 1.0, rtol=1e-6)


def test_checkpoint_with_a_variable_the_model_lacks_raises_before_assigning(tmp_path):
    _, _, path = saved_checkpoint(tmp_path, extra_head=True)
    model2 = named_mlp()
    ewc2 = fastewc.EWC(model2, lam=1.0)
    ewc2.add_task([np.ones(v.shape, np.float32) for v in model2.trainable_variables])
    before = ewc2.state()
    with pytest.raises(ValueError, match=r"variable 'extra/kernel'.*has no variable with that path"):
        tf.train.Checkpoint(ewc=ewc2).restore(path)
    assert (ewc2.num_tasks, ewc2.lam) == (1, 1.0)
    for key, (a, mu) in before.items():
        np.testing.assert_array_equal(ewc2.state()[key][0], a)
        np.testing.assert_array_equal(ewc2.state()[key][1], mu)


# -- 3. EWCModel.save / ModelCheckpoint ----------------------------------------------------
def wrapped_model():
    model = named_mlp()
    ewc = fastewc.EWC(model, lam=2.0)
    x, y = data(n=24)
    ewc.consolidate((x, y), loss=LOGITS, jit_compile=False)
    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOGITS)
    return model, ewc, wrapped, x, y


def assert_saved(path, model, ewc, x):
    loaded = keras.models.load_model(path)                 # the wrapper, EWC state included
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    ewc2 = loaded.ewc
    assert ewc2.num_tasks == ewc.num_tasks
    for (a, mu), (a2, mu2) in zip(ewc.state().values(), ewc2.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)


def test_ewc_model_save_replaces_a_good_file_atomically(tmp_path, monkeypatch):
    model, ewc, wrapped, x, y = wrapped_model()
    path = tmp_path / "model.keras"
    model.save(path)                                       # a good file from before
    good = path.read_bytes()
    wrapped.fit(x, y, epochs=1, verbose=0)

    def failing_save(p):
        raise OSError("No space left on device")

    monkeypatch.setattr(ewc, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        wrapped.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good                       # untouched, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
    with pytest.raises(ValueError, match="Invalid filepath extension"):
        wrapped.save(tmp_path / "model.txt")               # Keras' own error, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]

    wrapped.save(path)
    assert_saved(path, model, ewc, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]     # one file


def test_model_checkpoint_saves_an_ewc_model_during_fit(tmp_path):
    model, ewc, wrapped, x, y = wrapped_model()
    path = tmp_path / "ckpt.keras"
    history = wrapped.fit(x, y, epochs=2, batch_size=8, verbose=0,
                          callbacks=[keras.callbacks.ModelCheckpoint(str(path))])
    assert len(history.history["loss"]) == 2               # fit was not stopped
    assert_saved(path, model, ewc, x)


# -- 4. λ and the merged state stay within float32 ----------------------------------------
def test_lam_above_float32_range_is_refused():
    model = mlp()
    for make in (lambda lam: fastewc.EWC(model, lam=lam),
                 lambda lam: setattr(fastewc.EWC(model, lam=1.0), "lam", lam),
                 lambda lam: fastewc.ewc_penalty([tf.ones(2)], [tf.ones(2)], [tf.ones(2)], lam)):
        with pytest.raises(ValueError, match=r"`lam` must be <= 3.4028234663852886e\+38 "
                                             r"\(float32's largest value.*Received: lam=1e\+39"):
            make(1e39)
    ewc = fastewc.EWC(model, lam=F32_MAX)                 # the largest float32 is fine
    ewc.add_task([np.ones(v.shape, np.float32) for v in model.trainable_variables])
    assert float(ewc.penalty()) == 0.0                    # at the anchor: 0, not NaN


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_a_merge_that_overflows_float32_is_refused_and_changes_nothing(mode):
    model = named_mlp()
    ewc = fastewc.EWC(model, lam=1.0, mode=mode)
    big = [np.full(v.shape, 3e38, np.float32) for v in model.trainable_variables]
    ewc.add_task(big)
    before = ewc.state()
    with pytest.raises(ValueError, match=r"adding the Fisher of variable '.*h/kernel' would "
                                         r"overflow the float32 EWC state.*unchanged"):
        ewc.add_task(big)
    assert ewc.num_tasks == 1
    for key, (a, mu) in ewc.state().items():
        np.testing.assert_array_equal(a, before[key][0])
        np.testing.assert_array_equal(mu, before[key][1])
        assert np.isfinite(a).all()


def test_a_merge_whose_constant_overflows_float32_is_refused():
    """c = Σ A·F/(A + F)·(μ − θ)²: anchors far apart overflow it, for one variable or only in
    the sum over variables (each share 1.2e38, four of them)."""
    model = named_mlp()
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    ones = [np.ones(s, np.float32) for s in shapes]
    zeros = [np.zeros(s, np.float32) for s in shapes]
    far = [np.full(s, np.sqrt(2 * 1.2e38 / np.prod(s)), np.float32) for s in shapes]
    for anchors, message in (
            ([np.full(s, 1e19, np.float32) for s in shapes],
             r"variable '.*h/kernel' would overflow the float32 EWC state: its share of the "
             r"separate-mode constant c"),
            (far, r"the constant c of the separate-mode penalty would reach 4.8e\+38, above "
                  r"float32's largest value .*variable '.*' adds the most")):
        ewc = fastewc.EWC(model, lam=1.0)
        ewc.add_task(ones, anchors=zeros)
        with pytest.raises(ValueError, match=message + r".*The state is unchanged"):
            ewc.add_task(ones, anchors=anchors)
        assert ewc.num_tasks == 1 and float(ewc._const.numpy()) == 0.0


def test_merge_all_flags_a_float32_overflow_as_an_unusable_fisher():
    a, mu, theta = [tf.fill([2], 3e38)], [tf.zeros([2])], [tf.zeros([2])]
    for online in (False, True):
        _, _, _, bad = penalty_lib.merge_all(a, mu, [tf.constant([3e38, 0.0])], theta, online,
                                             tf.constant(1.0, tf.float64))
        assert bad.numpy().tolist() == [[True, False]]


# -- 5. evaluate reports the penalty ------------------------------------------------------
def test_evaluate_reports_the_ewc_penalty_and_keeps_the_data_loss():
    model, ewc, wrapped, x, y = wrapped_model()
    for v in model.trainable_variables:
        v.assign_add(0.1 * tf.ones_like(v))
    penalty = float(ewc.penalty())
    assert penalty > 0
    logs = wrapped.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["ewc_penalty"], penalty, rtol=1e-6)
    np.testing.assert_allclose(logs["loss"], float(LOGITS(y, model(x))), rtol=1e-5)
    history = wrapped.fit(x, y, epochs=1, batch_size=8, verbose=0, validation_data=(x, y))
    np.testing.assert_allclose(history.history["val_ewc_penalty"][0], float(ewc.penalty()),
                               rtol=1e-6)


# -- 6. a layer's trainable flag changed after make_train_step ----------------------------
def test_freezing_a_layer_after_make_train_step_stops_updating_it():
    model = named_mlp()
    ewc = fastewc.EWC(model, lam=1.0)
    x, y = data(n=16)
    ewc.consolidate((x, y), loss=LOGITS, jit_compile=False)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOGITS, ewc=ewc,
                                   jit_compile=False)
    step(x, y)
    traces = step.tracing_count()
    hidden = model.get_layer("h")
    hidden.trainable = False
    frozen = [v.numpy().copy() for v in hidden.weights]
    out = [v.numpy().copy() for v in model.get_layer("out").weights]
    step(x, y)
    assert step.tracing_count() == traces + 1             # traced again, once
    for v, w in zip(hidden.weights, frozen):
        np.testing.assert_array_equal(v.numpy(), w)       # not updated any more
    assert any((v.numpy() != w).any() for v, w in zip(model.get_layer("out").weights, out))
    step(x, y)
    assert step.tracing_count() == traces + 1
    hidden.trainable = True                                # back to what the step was made for
    step(x, y)


def test_a_layer_made_trainable_after_make_train_step_is_named():
    model = named_mlp()
    model.get_layer("h").trainable = False
    ewc = fastewc.EWC(model, lam=1.0)
    step = fastewc.make_train_step(model, keras.optimizers.SGD(0.1), LOGITS, ewc=ewc,
                                   jit_compile=False)
    x, y = data(n=8)
    step(x, y)
    model.get_layer("h").trainable = True
    with pytest.raises(ValueError, match=r"trainable variables of `model` '.*' changed since this "
                                         r"step was made \(now trainable: \['.*h/kernel', '.*h/bias'\]"
                                         r".*make a new step"):
        step(x, y)


def test_an_ewc_on_another_model_with_the_same_variables_is_not_another_model():
    model = named_mlp()
    ewc = fastewc.EWC(model, lam=1.0)
    inp = keras.Input((6,))
    outer = keras.Model(inp, model(inp))                     # the same variables
    fastewc.make_train_step(outer, "sgd", LOGITS, ewc=ewc)
    outer.trainable = False                                  # every layer frozen
    fastewc.EWCModel(outer, ewc)                             # was "built on another model"
    with pytest.raises(ValueError, match=r"has no trainable variables"):
        fastewc.make_train_step(outer, "sgd", LOGITS, ewc=ewc)
    with pytest.raises(ValueError, match=r"`ewc` was built on model"):
        fastewc.make_train_step(named_mlp(), "sgd", LOGITS, ewc=ewc)


# -- 7. every damaged EWC file is reported as one -----------------------------------------
def test_every_bit_flip_loads_the_same_state_or_is_reported_as_corrupt(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    ewc = fastewc.EWC(model, lam=0.5)
    ewc.add_task([np.full(v.shape, 0.25, np.float32) for v in model.trainable_variables])
    good = tmp_path / "good.npz"
    ewc.save(good)
    raw = good.read_bytes()
    want = ewc_file_lib.read(good)
    bits = list(range(min(len(raw), 2048) * 8))
    rest = range(len(bits), len(raw) * 8)
    bits += list(np.random.default_rng(0).choice(rest, size=min(len(rest), 2000), replace=False))
    path = tmp_path / "flipped.npz"
    outcomes = {"same": 0, "corrupt": 0}
    for bit in bits:
        damaged = bytearray(raw)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        try:
            got = ewc_file_lib.read(path)
        except ValueError as err:
            assert "is not a valid fastewc EWC file" in str(err), (bit, err)
            outcomes["corrupt"] += 1
            continue
        assert got._replace(state=None) == want._replace(state=None), bit
        assert list(got.state) == list(want.state), bit
        for key, (a, mu) in want.state.items():
            np.testing.assert_array_equal(got.state[key][0], a)
            np.testing.assert_array_equal(got.state[key][1], mu)
        outcomes["same"] += 1
    assert outcomes["corrupt"] > 0.5 * len(bits)
    # Through the public entry point too: the zip's "version needed to extract" (central
    # directory) raised NotImplementedError("zip file version ...") before.
    damaged = bytearray(raw)
    damaged[raw.index(b"PK\x01\x02") + 6] ^= 0x80
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is not a valid fastewc EWC file.*NotImplementedError"):
        fastewc.EWC.load(path, model)
