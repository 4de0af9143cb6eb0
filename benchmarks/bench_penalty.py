"""Fused EWC penalty + gradient vs the naive per-task sum, ~10M parameters, T = 1, 5, 20.

    fused_tape    tf.function: GradientTape over ``ewc.penalty()`` (custom gradient)
    fused_direct  tf.function: ``ewc.penalty_and_gradients()`` (no tape)
    fused_xla     fused_tape under ``jit_compile=True`` (what an XLA train step gets; on CPU
                  XLA's reductions are slow, so the default is no XLA there)
    naive         tf.function: GradientTape over Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)², holding all
                  T tasks' F_t and θ_t (2·T·P floats)

Model: MLP 784-2048-2048-2048-10 (10,020,874 parameters).  Acceptance (issue 4): fused
time flat in T (T=20 within 1.2x of T=1), >= 3x faster than naive at T=5, state 2 floats
per parameter whatever T (``extra_info["state_bytes"]``).

    .venv/bin/python -m pytest benchmarks/bench_penalty.py --benchmark-only -q
    .venv/bin/python -m pytest benchmarks/bench_penalty.py --benchmark-disable -q   # smoke

Every variant is warmed up (traced) before timing and forces completion with ``.numpy()``.
The big tensors are built once per module; the EWC state is advanced task by task
(T = 1, then 5, then 20), so the smoke run stays short.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastewc  # noqa: E402

TASKS = (1, 5, 20)
LAM = 50.0
ROUNDS = {"fused_tape": 15, "fused_direct": 15, "fused_xla": 15, "naive": 5}


class Problem:
    def __init__(self):
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(2048, activation="relu", name="d1"),
            keras.layers.Dense(2048, activation="relu", name="d2"),
            keras.layers.Dense(2048, activation="relu", name="d3"),
            keras.layers.Dense(10, name="logits"),
        ])
        self.variables = self.model.trainable_variables
        self.params = sum(int(np.prod(v.shape)) for v in self.variables)
        # Task t: F_t and θ_t − θ are fixed random tensors rolled by t along axis 0 (distinct
        # per task, and far cheaper to make than fresh random numbers); made on demand.
        self._base = [(tf.random.stateless_uniform(v.shape, seed=[0, i]),
                       0.01 * tf.random.stateless_normal(v.shape, seed=[1, i]))
                      for i, v in enumerate(self.variables)]
        self.tasks = []            # (F_t, θ_t) lists of float32 tensors
        self._naive_values = {}
        self.ewc = fastewc.EWC(self.model, lam=LAM)
        self._fns = {}

    def advance_to(self, num_tasks):
        """Consolidate tasks until the EWC holds ``num_tasks`` (state size never changes)."""
        while len(self.tasks) < num_tasks:
            t = len(self.tasks)
            self.tasks.append(([tf.roll(f, t, axis=0) for f, _ in self._base],
                               [v + tf.roll(n, t, axis=0) for v, (_, n) in zip(self.variables, self._base)]))
        if self.ewc.num_tasks > num_tasks:
            raise RuntimeError("run the T values in increasing order")
        while self.ewc.num_tasks < num_tasks:
            fisher, anchors = self.tasks[self.ewc.num_tasks]
            self.ewc.add_task(fisher, anchors)

    def naive_value(self, num_tasks):
        if num_tasks not in self._naive_values:
            self._naive_values[num_tasks] = self.fn("naive", num_tasks)()[0].numpy()
        return self._naive_values[num_tasks]

    def fn(self, variant, num_tasks):
        key = variant if variant != "naive" else (variant, num_tasks)
        if key not in self._fns:
            self._fns[key] = getattr(self, "_make_" + variant)(num_tasks)
        return self._fns[key]

    def _make_fused_tape(self, num_tasks):
        ewc, variables = self.ewc, self.variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                value = ewc.penalty()
            return value, tape.gradient(value, variables)
        return step

    def _make_fused_xla(self, num_tasks):
        ewc, variables = self.ewc, self.variables

        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                value = ewc.penalty()
            return value, tape.gradient(value, variables)
        return step

    def _make_fused_direct(self, num_tasks):
        return tf.function(self.ewc.penalty_and_gradients)

    def _make_naive(self, num_tasks):
        tasks, variables = self.tasks[:num_tasks], self.variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                value = tf.add_n([0.5 * LAM * tf.reduce_sum(f * tf.square(v - a))
                                  for fisher, anchors in tasks
                                  for v, f, a in zip(variables, fisher, anchors)])
            return value, tape.gradient(value, variables)
        return step


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.mark.parametrize("num_tasks, variant", [
    (t, v) for t in TASKS for v in ("fused_tape", "fused_direct", "fused_xla", "naive")])   # T increasing
def test_penalty_and_gradient(benchmark, smoke, problem, variant, num_tasks):
    if smoke and num_tasks == TASKS[-1]:
        pytest.skip("smoke subset: T = 1 and 5 (T = 20 runs the same code on 20x the naive state)")
    problem.advance_to(num_tasks)
    step = problem.fn(variant, num_tasks)

    def run():
        value, grads = step()
        grads[-1].numpy()
        return value.numpy()

    value = run()                                   # trace + check, outside the timing
    naive = problem.naive_value(num_tasks)
    np.testing.assert_allclose(value, naive, rtol=1e-4)
    benchmark.group = f"penalty+gradient, {problem.params / 1e6:.1f}M params, T={num_tasks}"
    benchmark.extra_info.update(
        params=problem.params, tasks=num_tasks,
        state_bytes=(problem.ewc.state_bytes if variant != "naive"
                     else 2 * num_tasks * problem.params * 4),
        bytes_per_param=(8 if variant != "naive" else 8 * num_tasks),
        fused_state_bytes=problem.ewc.state_bytes)
    benchmark.pedantic(run, rounds=ROUNDS[variant], iterations=1, warmup_rounds=1)
    assert problem.ewc.state_bytes == 2 * 4 * problem.params
