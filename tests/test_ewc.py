"""fastewc.EWC against float64 references of the naive per-task penalty."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import penalty as penalty_lib
from fastewc.testing import float64_twin, reference_fisher

from conftest import perturb, weights64

LOSS = "sparse_categorical_crossentropy"
LAM = 3.0


def make_model(hidden=8, classes=4, d_in=6):
    """Layers are named so that paths match across rebuilt models."""
    return keras.Sequential([
        keras.Input((d_in,)),
        keras.layers.Dense(hidden, activation="tanh", name="h"),
        keras.layers.Dense(classes, activation="softmax", name="out"),
    ])


def task_data(seed, n=8, d_in=6, classes=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_in)).astype(np.float32), rng.integers(0, classes, size=n)




def naive_value(thetas, tasks, lam=LAM):
    """Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)², float64 NumPy."""
    return sum(0.5 * lam * np.sum(np.asarray(f, np.float64) * (t - np.asarray(a, np.float64)) ** 2)
               for fs, anchors in tasks for t, f, a in zip(thetas, fs, anchors))


def naive_grads(thetas, tasks, lam=LAM):
    """tf.GradientTape in float64 of the naive per-task sum."""
    th = [tf.constant(t) for t in thetas]
    with tf.GradientTape() as tape:
        tape.watch(th)
        total = tf.add_n([0.5 * lam * tf.reduce_sum(tf.constant(f, tf.float64) * tf.square(t - tf.constant(a, tf.float64)))
                          for fs, anchors in tasks for t, f, a in zip(th, fs, anchors)])
    return [g.numpy() for g in tape.gradient(total, th)]


def random_fisher(model, rng, zero_frac=0.3):
    return [np.where(rng.random(v.shape) < zero_frac, 0.0, rng.gamma(0.5, 1.0, v.shape)).astype(np.float32)
            for v in model.trainable_variables]


def assert_penalty_matches(ewc, tasks, rtol=1e-5, atol=1e-5):
    model = ewc.model
    thetas = weights64(model)
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    grads = tape.gradient(value, model.trainable_variables)
    assert value.shape == () and value.dtype == tf.float32
    np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks), rtol=rtol)
    want = naive_grads(thetas, tasks)
    direct = ewc.penalty_gradients()
    value2, fused = ewc.penalty_and_gradients()
    assert value2.numpy() == value.numpy()
    assert len(direct) == len(fused) == len(want) == len(model.trainable_variables)
    for g, d, f, w, v in zip(grads, direct, fused, want, model.trainable_variables):
        assert g.shape == d.shape == v.shape and d.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=atol)
        np.testing.assert_allclose(d.numpy(), g.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(f.numpy(), g.numpy())


# -- the maths ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 5])
def test_separate_equals_naive_per_task_sum(num_tasks):
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    rng = np.random.default_rng(num_tasks)
    tasks = []
    for t in range(num_tasks):
        perturb(model, seed=10 * num_tasks + t)
        fisher = random_fisher(model, rng)
        tasks.append((fisher, weights64(model)))
        ewc.add_task(fisher)
    assert ewc.num_tasks == num_tasks
    perturb(model, seed=99)
    assert_penalty_matches(ewc, tasks)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert ewc.state_bytes == 2 * 4 * params          # whatever the number of tasks


def test_consolidate_with_real_fisher_matches_float64_reference():
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    tasks = []
    for t in range(2):
        perturb(model, seed=t)
        x, y = task_data(seed=t)
        got = ewc.consolidate((x, y), loss=LOSS, kind="exact")
        want = reference_fisher(float64_twin(model), x, y, loss=LOSS, kind="exact")
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-9)
        tasks.append((want, weights64(model)))
    assert ewc.num_tasks == 2
    perturb(model, seed=7)
    assert_penalty_matches(ewc, tasks, rtol=1e-4, atol=1e-6)


def test_online_matches_its_formula():
    model = make_model()
    gamma = 0.5
    ewc = fastewc.EWC(model, lam=LAM, mode="online", gamma=gamma)
    rng = np.random.default_rng(0)
    fishers = []
    for t in range(3):
        perturb(model, seed=t)
        fishers.append(random_fisher(model, rng))
        ewc.add_task(fishers[-1])
    anchor = weights64(model)
    f_online = [gamma ** 2 * a.astype(np.float64) + gamma * b + c for a, b, c in zip(*fishers)]
    for (a, mu), f, th in zip(ewc.state().values(), f_online, anchor):
        np.testing.assert_allclose(a, f, rtol=1e-6)
        np.testing.assert_array_equal(mu, th)
    perturb(model, seed=5)
    assert_penalty_matches(ewc, [(f_online, anchor)])


def test_zero_at_a_single_tasks_anchor():
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    assert ewc.penalty().numpy() == 0.0               # nothing consolidated yet
    ewc.consolidate(task_data(0), loss=LOSS)
    assert ewc.penalty().numpy() == 0.0
    assert all(np.all(g.numpy() == 0.0) for g in ewc.penalty_gradients())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_penalty_does_not_retrace_across_consolidations(jit_compile):
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)

    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            value = ewc.penalty()
        return value, tape.gradient(value, model.trainable_variables), ewc.penalty_gradients()

    assert step()[0].numpy() == 0.0
    rng = np.random.default_rng(1)
    tasks = []
    for t in range(3):
        perturb(model, seed=t)
        fisher = random_fisher(model, rng)
        tasks.append((fisher, weights64(model)))
        ewc.add_task(fisher)
        ewc.lam = LAM                     # a lam assignment does not retrace either
        perturb(model, seed=50 + t)
        value, grads, direct = step()
        thetas = weights64(model)
        np.testing.assert_allclose(value.numpy(), naive_value(thetas, tasks), rtol=1e-5)
        for g, d, w in zip(grads, direct, naive_grads(thetas, tasks)):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(d.numpy(), w, rtol=1e-5, atol=1e-5)
    assert step.experimental_get_tracing_count() == 1


def test_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        ewc = fastewc.EWC(model, lam=LAM)
        perturb(model, seed=0)
        x, y = task_data(0)
        fisher = ewc.consolidate((x, y), loss=LOSS)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(f.dtype == tf.float32 for f in fisher)
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    perturb(model, seed=1, scale=1e-3)          # a small move: float16 weights would lose it
    from keras.src.backend.common.variables import AutocastScope
    with AutocastScope("float16"):
        value = ewc.penalty()
    assert value.dtype == tf.float32
    want = naive_value(weights64(model), [([f.numpy() for f in fisher], ewc_anchor(ewc))])
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-5)
    assert_penalty_matches(ewc, [([f.numpy() for f in fisher], ewc_anchor(ewc))])


def ewc_anchor(ewc):
    return [mu.astype(np.float64) for _, mu in ewc.state().values()]


# -- variables: new, missing, reshaped, excluded ------------------------------------------
def test_new_head_is_not_penalized_then_consolidated():
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.consolidate(task_data(0), loss=LOSS)
    perturb(model, seed=1)
    before = ewc.penalty().numpy()
    model.add(keras.layers.Dense(3, activation="softmax", name="head2"))   # the model grows
    new = model.trainable_variables[-2:]
    assert [v.path for v in new] == ["sequential/head2/kernel", "sequential/head2/bias"] or \
        all("head2" in v.path for v in new)
    for v in new:
        v.assign(np.full(v.shape, 5.0, np.float32))
    assert ewc.penalty().numpy() == before
    grads = ewc.penalty_gradients()
    assert len(grads) == len(model.trainable_variables)
    assert all(np.all(g.numpy() == 0.0) for g in grads[-2:])
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    assert all(g is None or np.all(g.numpy() == 0.0) for g in tape.gradient(value, new))
    # The next consolidation takes the head in: its A is that task's Fisher.
    x, y = task_data(2, classes=3)
    # method="loop": fisher_diagonal caches its compiled "factored" engine per model with
    # the variable list of its first trace, which misses the new head (see the report).
    fisher = ewc.consolidate((x, y), loss=LOSS, method="loop")
    assert "head2/kernel" in ewc.tracked_paths
    a, mu = ewc.state()["head2/kernel"]
    np.testing.assert_array_equal(a, fisher[-2].numpy())
    np.testing.assert_array_equal(mu, new[0].numpy())


def test_rebinding_to_a_functional_model_with_a_new_head():
    inp = keras.Input((6,))
    trunk = keras.layers.Dense(8, activation="tanh", name="trunk")
    head1 = keras.layers.Dense(4, activation="softmax", name="head1")
    model1 = keras.Model(inp, head1(trunk(inp)))
    ewc = fastewc.EWC(model1, lam=LAM)
    rng = np.random.default_rng(0)
    fisher = random_fisher(model1, rng)
    ewc.add_task(fisher)
    perturb(model1, seed=1)
    tasks = [(fisher, ewc_anchor(ewc))]
    head2 = keras.layers.Dense(3, name="head2")
    model2 = keras.Model(inp, [head1(trunk(inp)), head2(trunk(inp))])
    ewc.model = model2
    assert len(ewc.penalty_gradients()) == 6
    np.testing.assert_allclose(ewc.penalty().numpy(), naive_value(weights64(model1), tasks), rtol=1e-5)
    with pytest.raises(ValueError, match="'trunk/kernel'.*no variable with that path"):
        ewc.model = make_model()
    assert ewc.model is model2


def test_missing_or_reshaped_variable_raises_naming_it():
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.consolidate(task_data(0), loss=LOSS)
    model.pop()
    for call in (ewc.penalty, ewc.penalty_gradients, lambda: ewc.consolidate(task_data(1), loss=LOSS)):
        with pytest.raises(ValueError, match=r"tracks variable 'out/kernel' \(shape \(8, 4\)\).*no variable with that path"):
            call()
    model.add(keras.layers.Dense(5, activation="softmax", name="out"))
    with pytest.raises(ValueError, match=r"'sequential.*/out/kernel' has shape \(8, 5\), but the EWC state tracks it with shape \(8, 4\)"):
        ewc.penalty()
    assert ewc.num_tasks == 1


@pytest.mark.parametrize("how", ["paths", "variables", "predicate"])
def test_exclude(how):
    model = make_model()
    h_bias = model.layers[0].bias
    exclude = {"paths": ["h/bias"], "variables": [h_bias],
               "predicate": lambda v: v.path.endswith("h/bias")}[how]
    ewc = fastewc.EWC(model, lam=LAM, exclude=exclude)
    assert ewc.tracked_paths == ["h/kernel", "out/kernel", "out/bias"]
    ewc.consolidate(task_data(0), loss=LOSS)
    perturb(model, seed=3)
    before = ewc.penalty().numpy()
    h_bias.assign(h_bias.numpy() + 10.0)
    assert ewc.penalty().numpy() == before
    grads = ewc.penalty_gradients()
    assert np.all(grads[1].numpy() == 0.0) and np.any(grads[0].numpy() != 0.0)


def test_exclude_errors():
    with pytest.raises(ValueError, match=r"`exclude` names variables that model '.*' does not have: \['nope/kernel'\]"):
        fastewc.EWC(make_model(), lam=1.0, exclude=["nope/kernel"])
    with pytest.raises(ValueError, match="`exclude` entries must be variables or variable paths"):
        fastewc.EWC(make_model(), lam=1.0, exclude=[3])


# -- all or nothing -------------------------------------------------------------------------
def test_failed_consolidation_leaves_the_state_unchanged():
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.consolidate(task_data(0), loss=LOSS)
    perturb(model, seed=1)
    before, state = ewc.penalty().numpy(), ewc.state()
    x, y = task_data(1)
    with pytest.raises(ValueError, match="class ids"):
        ewc.consolidate((x, y + 10), loss=LOSS)             # labels out of range
    bad = random_fisher(model, np.random.default_rng(0))
    bad[-1][0] = np.nan
    with pytest.raises(ValueError, match="'sequential.*/out/bias' must be finite and >= 0"):
        ewc.add_task(bad)
    with pytest.raises(ValueError, match="one entry per trainable variable"):
        ewc.add_task(bad[:-1])
    assert ewc.num_tasks == 1 and ewc.penalty().numpy() == before
    for k, (a, mu) in ewc.state().items():
        np.testing.assert_array_equal(a, state[k][0])
        np.testing.assert_array_equal(mu, state[k][1])


# -- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"lam": -1}, "`lam` must be >= 0. Received: lam=-1"),
    ({"lam": "big"}, "`lam` must be a finite number >= 0. Received: lam='big'"),
    ({"lam": 1.0, "mode": "online", "gamma": 1.5}, r"`gamma` must be a number in \[0, 1\]. Received: gamma=1.5"),
    ({"lam": 1.0, "gamma": 0.9}, "`gamma` only applies to mode='online'"),
    ({"lam": 1.0, "mode": "sum"}, "`mode` must be one of 'separate', 'online'. Received: mode='sum'"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastewc.EWC(make_model(), **kwargs)


def test_lam_setter_validates():
    ewc = fastewc.EWC(make_model(), lam=1.0)
    ewc.lam = 2.5
    assert ewc.lam == 2.5
    with pytest.raises(ValueError, match="`lam` must be >= 0. Received: lam=-0.5"):
        ewc.lam = -0.5
    assert ewc.lam == 2.5


# -- save / load / checkpoint -------------------------------------------------------------
def consolidated_ewc(mode="separate", gamma=1.0, num_tasks=2):
    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM, mode=mode, gamma=gamma)
    for t in range(num_tasks):
        perturb(model, seed=t)
        ewc.consolidate(task_data(t), loss=LOSS)
    perturb(model, seed=9)
    return model, ewc


@pytest.mark.parametrize("mode, gamma", [("separate", 1.0), ("online", 0.8)])
def test_save_load_round_trip_is_exact(tmp_path, mode, gamma):
    model, ewc = consolidated_ewc(mode, gamma)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    assert os.listdir(tmp_path) == ["ewc.npz"]        # no temporary file left behind
    other = make_model()                              # another auto name: 'sequential_k'
    other.set_weights(model.get_weights())
    loaded = fastewc.EWC.load(path, other)
    assert (loaded.mode, loaded.lam, loaded.gamma, loaded.num_tasks) == (mode, LAM, gamma, 2)
    assert loaded.tracked_paths == ewc.tracked_paths
    for (a, mu), (a2, mu2) in zip(ewc.state().values(), loaded.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)
    assert loaded._const.numpy() == ewc._const.numpy()
    assert loaded.penalty().numpy() == ewc.penalty().numpy()
    ewc.save(path)                                     # overwrite in place
    assert os.listdir(tmp_path) == ["ewc.npz"]


def test_load_onto_mismatching_model_names_the_first_mismatch(tmp_path):
    _, ewc = consolidated_ewc(num_tasks=1)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    with pytest.raises(ValueError, match=r"variable '.*h/kernel' has shape \(6, 9\), the file has shape \(6, 8\)"):
        fastewc.EWC.load(path, make_model(hidden=9))
    renamed = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="h"), keras.layers.Dense(4, name="z")])
    with pytest.raises(ValueError, match="the file has variable 'out/kernel'"):
        fastewc.EWC.load(path, renamed)


def test_corrupted_or_truncated_file_raises(tmp_path):
    model, ewc = consolidated_ewc(num_tasks=1)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    corrupted = tmp_path / "corrupted.npz"
    corrupted.write_bytes(bytes(flipped))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz file")
    for bad in (truncated, corrupted, garbage):
        with pytest.raises(ValueError, match="not a valid fastewc EWC file"):
            fastewc.EWC.load(bad, model)


def test_checksum_catches_an_edited_value(tmp_path):
    model, ewc = consolidated_ewc(num_tasks=1)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    with np.load(path) as npz:
        contents = {k: npz[k].copy() for k in npz.files}
    contents["fisher_0"][0, 0] += 1.0                  # a well-formed file, tampered with
    np.savez(path, **contents)
    with pytest.raises(ValueError, match="SHA-256 checksum mismatch"):
        fastewc.EWC.load(path, model)


def test_tf_train_checkpoint_round_trip(tmp_path):
    model, ewc = consolidated_ewc()
    optimizer = keras.optimizers.Adam(1e-3)
    x, y = task_data(5)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x)) + ewc.penalty()
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    saved = tf.train.Checkpoint(model=model, optimizer=optimizer, ewc=ewc).save(str(tmp_path / "ckpt"))

    model2 = make_model()
    optimizer2 = keras.optimizers.Adam(1e-3)
    optimizer2.build(model2.trainable_variables)
    ewc2 = fastewc.EWC(model2, lam=0.5, mode="online", gamma=0.3)
    status = tf.train.Checkpoint(model=model2, optimizer=optimizer2, ewc=ewc2).restore(saved)
    status.assert_existing_objects_matched()
    assert (ewc2.mode, ewc2.lam, ewc2.gamma, ewc2.num_tasks) == ("separate", LAM, 1.0, 2)
    for (a, mu), (a2, mu2) in zip(ewc.state().values(), ewc2.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)
    assert ewc2.penalty().numpy() == ewc.penalty().numpy()


def test_unbuilt_model_gets_its_state_at_the_first_consolidation():
    model = keras.Sequential([keras.layers.Dense(8, activation="tanh", name="h"),
                              keras.layers.Dense(4, activation="softmax", name="out")])
    ewc = fastewc.EWC(model, lam=LAM)
    assert ewc.tracked_paths == [] and ewc.penalty().numpy() == 0.0
    x, y = task_data(0)
    model(x)
    fisher = ewc.consolidate((x, y), loss=LOSS)
    assert ewc.tracked_paths == ["h/kernel", "h/bias", "out/kernel", "out/bias"]
    perturb(model, seed=1)
    assert_penalty_matches(ewc, [([f.numpy() for f in fisher], ewc_anchor(ewc))])


def test_load_tracks_the_files_variables_in_order_even_when_frozen_since(tmp_path):
    """load goes through the same tracking as construction: the saved keys in the file's
    order (trainable or not), then any other trainable variable with zero state."""
    model, ewc = consolidated_ewc(num_tasks=1)
    path = tmp_path / "ewc.npz"
    ewc.save(path)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="h"),
                              keras.layers.Dense(4, activation="softmax", name="out"),
                              keras.layers.Dense(2, name="extra")])
    other.layers[0].trainable = False                      # 'h' frozen since the save
    loaded = fastewc.EWC.load(path, other)
    assert loaded.tracked_paths == ewc.tracked_paths + ["extra/kernel", "extra/bias"]
    for key, (a, mu) in ewc.state().items():
        np.testing.assert_array_equal(loaded.state()[key][0], a)
        np.testing.assert_array_equal(loaded.state()[key][1], mu)
    assert not loaded.state()["extra/kernel"][0].any()
    assert loaded.num_tasks == 1 and float(loaded._const.numpy()) == float(ewc._const.numpy())


def test_the_plan_is_a_named_tuple_rebuilt_when_the_tracked_set_grows():
    from fastewc._tracking import PenaltyPlan

    model = make_model()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.add_task(random_fisher(model, np.random.default_rng(0)))
    plan = ewc._plan()
    assert isinstance(plan, PenaltyPlan) and ewc._plan() is plan          # cached
    assert plan.trainable == list(model.trainable_variables)
    assert [b.variables for b in plan.blocks] == [(v,) for v in model.trainable_variables]  # state order
    model.add(keras.layers.Dense(3, name="head2"))
    grown = ewc._plan()
    assert grown is not plan and len(grown.trainable) == 6 and len(grown.blocks) == 4
    ewc.add_task(random_fisher(model, np.random.default_rng(1)))
    assert len(ewc._plan().blocks) == 6


def test_file_module_round_trip_and_checks(tmp_path):
    from fastewc import ewc_file

    state = {"a/kernel": (np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)),
             "a/bias": (np.full(3, 2.0, np.float32), np.ones(3, np.float32))}
    contents = ewc_file.EWCFile(mode="online", lam=2.0, gamma=0.5, num_tasks=3, const=0.0,
                                state=state, excluded=["b/bias"])
    path = tmp_path / "state.npz"
    ewc_file.write(path, contents)
    back = ewc_file.read(path)
    assert list(back.state) == ["a/kernel", "a/bias"] and back.excluded == ["b/bias"]
    assert (back.mode, back.lam, back.gamma, back.num_tasks) == ("online", 2.0, 0.5, 3)
    for key, (a, mu) in state.items():
        np.testing.assert_array_equal(back.state[key][0], a)
        np.testing.assert_array_equal(back.state[key][1], mu)
    # A well-formed, correctly signed file that lists one path twice is refused.
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "header"}
        header = __import__("json").loads(npz["header"].tobytes())
    header["variables"][1]["path"] = "a/kernel"
    header["variables"][1]["shape"] = [3]
    header["sha256"] = ewc_file.digest(header, arrays)
    raw = np.frombuffer(__import__("json").dumps(header).encode(), np.uint8)
    np.savez(path, header=raw, **arrays)
    with pytest.raises(ValueError, match="not a valid fastewc EWC file.*listed twice"):
        ewc_file.read(path)
