"""A train step in one thread and a consolidation's commit in another (issue 26, item 12):
the step reads the whole state before or the whole state after the task, never a mix.

Deterministic: the commit is paused half-way (after A and μ, before c) on an Event, the
step is started then, and the test resumes the commit only once the step waits for it
(an instrumented wait of the EWC's state guard), or once the step finished without
waiting (the bug: it then read the new A, μ with the old c).  No sleeps."""
import threading

import keras
import numpy as np
import pytest

import fastewc

N, DIN, DOUT, LAM = 5, 4, 3, 2.0
TIMEOUT = 120          # a failsafe against a hang, never reached when the test passes


def _setup(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((DIN,)), keras.layers.Dense(DOUT)])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, DIN)).astype("float32")
    y = rng.normal(size=(N, DOUT)).astype("float32")
    tasks = [([rng.uniform(0.5, 1.5, v.shape).astype("float32") for v in model.trainable_variables],
              [(v.numpy() + rng.normal(0, 1.0, v.shape)).astype("float32")
               for v in model.trainable_variables]) for _ in range(2)]
    return model, x, y, tasks


def _objective64(model, x, y, tasks):
    """L_data + Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² in float64 (MSE; the separate-mode penalty
    as the per-task sum, not fastewc's merged state)."""
    kernel, bias = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    data = np.mean((x.astype(np.float64) @ kernel + bias - y) ** 2)
    thetas = [kernel, bias]
    return data + sum(LAM / 2 * sum(np.sum(f * (t - a) ** 2) for t, f, a in zip(thetas, fs, anchors))
                      for fs, anchors in tasks)


def _step_during_paused_commit(ewc, run_step, task):
    """Thread C adds ``task``, paused after assigning A and μ; thread T calls ``run_step``
    then.  Returns (T's value, whether T finished while C was still paused)."""
    paused, resume, progress, done = (threading.Event() for _ in range(4))
    const, original = ewc._const, ewc._const.assign_add

    def paused_assign_add(*args, **kwargs):
        paused.set()
        assert resume.wait(TIMEOUT)
        return original(*args, **kwargs)

    const.assign_add = paused_assign_add
    guard = getattr(ewc, "state_guard", None)
    if guard is not None:                # progress: the step waits for the commit
        wait = guard._cond.wait

        def instrumented_wait(*args, **kwargs):
            progress.set()
            return wait(*args, **kwargs)

        guard._cond.wait = instrumented_wait
    out = []

    def step_thread():
        try:
            out.append(run_step())
        finally:
            done.set()
            progress.set()               # ... or it did not wait

    commit = threading.Thread(target=ewc.add_task, args=task)
    commit.start()
    try:
        assert paused.wait(TIMEOUT)
        trainer = threading.Thread(target=step_thread)
        trainer.start()
        assert progress.wait(TIMEOUT)
        finished_during_commit = done.is_set()
    finally:
        resume.set()
        commit.join(TIMEOUT)
    trainer.join(TIMEOUT)
    del const.assign_add
    return out[0], finished_during_commit


@pytest.mark.parametrize("kind", ["make_train_step", "fit"])
def test_a_step_never_reads_half_a_commit(kind):
    model, x, y, tasks = _setup()
    ewc = fastewc.EWC(model, lam=LAM)
    ewc.add_task(*tasks[0])
    if kind == "make_train_step":
        step = fastewc.make_train_step(model, keras.optimizers.SGD(0.0), "mse", ewc=ewc, jit_compile=False)
        run = lambda: float(step(x, y))  # noqa: E731
    else:
        wrapped = fastewc.EWCModel(model, ewc)
        wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=False)
        run = lambda: wrapped.fit(x, y, batch_size=N, verbose=0).history["loss"][-1]  # noqa: E731
    old = _objective64(model, x, y, tasks[:1])
    np.testing.assert_allclose(run(), old, rtol=1e-5)          # warm: traced, the old state

    got, finished_during_commit = _step_during_paused_commit(ewc, run, tasks[1])
    new = _objective64(model, x, y, tasks)
    assert not finished_during_commit, f"the step ran during the commit: {got} (old {old}, new {new})"
    np.testing.assert_allclose(got, new, rtol=1e-5)
    assert abs(new - old) > 1.0


def test_readers_writer_lock_nests_shared_and_holds_readers_behind_a_waiting_writer():
    from fastewc._rwlock import ReadersWriterLock

    lock = ReadersWriterLock()
    events = []
    writer_waits, reader_waits = threading.Event(), threading.Event()
    wait = lock._cond.wait

    def instrumented_wait(*args, **kwargs):
        (writer_waits if threading.current_thread().name == "writer" else reader_waits).set()
        return wait(*args, **kwargs)

    lock._cond.wait = instrumented_wait

    def writer():
        with lock.exclusive():
            events.append("write")

    def reader():
        with lock.shared():
            events.append("late read")

    with lock.shared():
        w = threading.Thread(target=writer, name="writer")
        w.start()
        assert writer_waits.wait(TIMEOUT)
        with lock.shared():               # nested in the same thread: no deadlock
            events.append("nested read")
        r = threading.Thread(target=reader, name="reader")
        r.start()
        assert reader_waits.wait(TIMEOUT)  # held back: a writer is waiting
        events.append("first read ends")
    w.join(TIMEOUT)
    r.join(TIMEOUT)
    assert events == ["nested read", "first read ends", "write", "late read"]
