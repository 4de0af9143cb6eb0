"""The state half of the curvature blocks (issue 25, items 1-2): the kinds' pure merges,
the penalty over blocks as ONE compiled function, the one store's transaction and each
kind's file section, against float64 NumPy; and no branch on the curvature kind on the
EWC side outside :mod:`fastewc.blocks`."""
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import blocks
from fastewc.blocks import penalty as block_penalty
from fastewc.blocks.diagonal import Diagonal
from fastewc.blocks.kronecker import Kronecker
from fastewc.blocks.store import State

LAM, DAMPING = 1.7, 0.05


def _psd(rng, n):
    m = rng.normal(size=(n, n))
    return (m @ m.T / n).astype(np.float32)


def _damped(a, g, damping):
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return a + pi * np.sqrt(damping) * np.eye(len(a)), g + np.sqrt(damping) / pi * np.eye(len(g))


def _problem(seed=0):
    """A kernel (3, 2) and bias (2,), each with a diagonal block, and a Kronecker block over
    both with two terms; the float64 penalty and gradients."""
    rng = np.random.default_rng(seed)
    kernel = tf.Variable(rng.normal(size=(3, 2)).astype(np.float32))
    bias = tf.Variable(rng.normal(size=2).astype(np.float32))
    diag = [(v, [tf.Variable(rng.uniform(0, 2, v.shape).astype(np.float32)),
                 tf.Variable(rng.normal(size=v.shape).astype(np.float32))]) for v in (kernel, bias)]
    terms = [[np.float32(c), _psd(rng, 4), _psd(rng, 2), rng.normal(size=(4, 2)).astype(np.float32)]
             for c in (1.0, 0.6)]
    fields = [tf.Variable(v) for term in terms for v in term]
    plan = [block_penalty.PlanBlock(Diagonal, (v,), f, v.name) for v, f in diag]
    plan.append(block_penalty.PlanBlock(Kronecker, (kernel, bias), fields, "kernel"))

    def reference(const):
        k, b = kernel.numpy().astype(np.float64), bias.numpy().astype(np.float64)
        value, grads = 0.5 * LAM * const, []
        for v, (a, mu) in diag:
            d = v.numpy().astype(np.float64) - mu.numpy()
            value += 0.5 * LAM * np.sum(a.numpy() * d * d)
            grads.append(LAM * a.numpy() * d)
        w = np.concatenate([k, b[None]])
        for c, a, g, anchor in terms:
            a_d, g_d = _damped(a.astype(np.float64), g.astype(np.float64), DAMPING)
            m = a_d @ (w - anchor) @ g_d
            value += 0.5 * LAM * c * np.sum((w - anchor) * m)
            grads[0] += LAM * c * m[:3]
            grads[1] += LAM * c * m[3]
        return value, grads

    return plan, [kernel, bias], diag, reference


def test_penalty_over_blocks_is_one_compiled_function_matching_float64():
    plan, trainable, diag, reference = _problem()
    fn = block_penalty.compiled(True)
    for step, const in enumerate((0.0, 0.4)):
        with tf.GradientTape() as tape:
            value, grads = block_penalty.penalty_and_gradients(plan, trainable, LAM, const, DAMPING)
        taped = tape.gradient(value, trainable)
        want_value, want_grads = reference(const)
        np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
        for g, t, w in zip(grads, taped, want_grads):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(t.numpy(), w, rtol=1e-4, atol=1e-5)   # the analytic gradient
        if step == 0:
            traces = fn.experimental_get_tracing_count()
            for _, fields in diag:                        # new values, same structure: no retrace
                fields[0].assign(fields[0] * 1.5)
    assert fn.experimental_get_tracing_count() == traces
    _, grads_only = block_penalty.penalty_and_gradients(plan, trainable, LAM, 0.4, DAMPING, with_value=False)
    for g, w in zip(grads_only, reference(0.4)[1]):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5)


def _dense_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])


class _Tracking:
    """The keys and anchors a merge reads, for a plain model."""

    def __init__(self, model):
        self.model = model

    def key(self, v):
        return v.path.split("/", 1)[1]

    def new_trainable(self, tracked):
        return [v for v in self.model.trainable_variables if self.key(v) not in tracked]

    def exclude(self, v):
        return False

    def by_key(self):
        return {self.key(v): v for v in self.model.variables}


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_kind_merges_are_pure_and_match_float64(mode):
    model = _dense_model()
    tracking = _Tracking(model)
    rng = np.random.default_rng(1)
    kernel, bias = model.trainable_variables
    current = {"d/kernel": [tf.constant(rng.uniform(0, 1, (3, 2)), tf.float32), tf.constant(rng.normal(size=(3, 2)), tf.float32)],
               "d/bias": [tf.constant(rng.uniform(0, 1, 2), tf.float32), tf.constant(rng.normal(size=2), tf.float32)]}
    fisher = {"d/kernel": rng.uniform(0, 1, (3, 2)).astype(np.float32), "d/bias": rng.uniform(0, 1, 2).astype(np.float32)}
    a_new, g_new = _psd(rng, 4), _psd(rng, 2)
    old_term = [np.float32(1.0), _psd(rng, 4), _psd(rng, 2), rng.normal(size=(4, 2)).astype(np.float32)]
    theta = {"d/kernel": kernel.numpy(), "d/bias": bias.numpy()}
    task = blocks.Task({"diagonal": {k: tf.constant(f) for k, f in fisher.items()},
                        "kfac": {("d/kernel", "d/bias"): ("d", tf.constant(a_new), tf.constant(g_new), None)}},
                       {k: tf.constant(t) for k, t in theta.items()}, tracking.by_key(), False)
    settings = blocks.Settings(mode, 0.5 if mode == "online" else 1.0, "exact", 0.25)
    merged, delta = Diagonal.merge(current, task, settings, tracking)
    for key, (a, mu) in current.items():
        a, mu, f, t = (np.asarray(x, np.float64) for x in (a, mu, fisher[key], theta[key]))
        if mode == "online":
            want_a, want_mu = 0.5 * a + f, t
        else:
            want_a, want_mu = a + f, (a * mu + f * t) / (a + f)
        np.testing.assert_allclose(merged[key][0].numpy(), want_a, rtol=1e-6)
        np.testing.assert_allclose(merged[key][1].numpy(), want_mu, rtol=1e-5, atol=1e-6)
    want_delta = 0.0 if mode == "online" else sum(
        np.sum(np.asarray(a, np.float64) * fisher[k] / (np.asarray(a, np.float64) + fisher[k])
               * (np.asarray(mu, np.float64) - theta[k]) ** 2) for k, (a, mu) in current.items())
    np.testing.assert_allclose(float(delta), want_delta, rtol=1e-6)
    kron, _ = Kronecker.merge({("d/kernel", "d/bias"): [tf.constant(v) for v in old_term]}, task, settings, tracking)
    (fields,) = kron.values()
    anchor = np.concatenate([theta["d/kernel"], theta["d/bias"][None]])
    want = old_term[:3] + [old_term[3] if mode == "separate" else anchor] + [1.0, a_new, g_new, anchor]
    if mode == "online":
        want[0] = 0.5
    for got, w in zip(fields, want):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6)


def test_the_store_commit_is_all_or_nothing_across_kinds():
    state = State(lam=1.0, mode="separate", gamma=1.0, curvature="kfac", damping=0.0, kfac_sum="exact")
    state.commit({"diagonal": {"k": [tf.ones(3), tf.zeros(3)]},
                  "kfac": {("k", None): [tf.constant(1.0), tf.eye(2), tf.eye(1), tf.zeros((2, 1))]}}, 0.5)
    before = (Diagonal.snapshot(state.variables(Diagonal)), Kronecker.snapshot(state.variables(Kronecker)))
    original = state._num_tasks.assign_add

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    state._num_tasks.assign_add = interrupted
    with pytest.raises(RuntimeError, match="interrupted"):     # after every block was written
        state.commit({"diagonal": {"k": [tf.fill([3], 2.0), tf.ones(3)], "new": [tf.ones(2), tf.ones(2)]},
                      "kfac": {("k", None): [tf.constant(2.0), tf.eye(2), tf.eye(1), tf.ones((2, 1))] * 2}}, 1.0)
    state._num_tasks.assign_add = original
    after = (Diagonal.snapshot(state.variables(Diagonal)), Kronecker.snapshot(state.variables(Kronecker)))
    assert sorted(after[0]) == ["k"] and len(after[1][("k", None)]) == 1     # created blocks and terms dropped
    for got, want in zip(tf.nest.flatten(after), tf.nest.flatten(before)):
        np.testing.assert_array_equal(got, want)
    assert float(state._const.numpy()) == 0.5 and int(state._num_tasks.numpy()) == 1
    assert sorted(state._tables["terms"].keys()) == [f"k||0|{f}" for f in sorted(("coef", "a", "g", "anchor"))]


@pytest.mark.parametrize("kind", [Diagonal, Kronecker])
def test_each_kind_writes_and_reads_its_file_section(kind):
    rng = np.random.default_rng(2)
    if kind is Diagonal:
        section = {"a/kernel": (rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32))}
    else:
        section = {("a/kernel", "a/bias"): [(np.float32(0.5), _psd(rng, 3), _psd(rng, 2), rng.normal(size=(3, 2)).astype(np.float32))] * 2}
    header, arrays = kind.file_arrays(section)
    assert {name: a.shape for name, a in arrays.items()} == kind.file_shapes(header)
    back = kind.read_file_arrays(header, arrays)
    assert list(back) == list(section)
    for got, want in zip(tf.nest.flatten(back), tf.nest.flatten(section)):
        np.testing.assert_array_equal(got, want)


def test_no_branch_on_the_curvature_kind_on_the_ewc_side():
    """The EWC side asks its kinds, never "is this Kronecker?" (issue 25, item 2)."""
    root = pathlib.Path(fastewc.__file__).parent
    branch = re.compile(r"curvature\s*[!=]=|[!=]=\s*[\"']kfac[\"']|isinstance\([^)]*KroneckerFisher")
    for name in ("ewc.py", "_tracking.py", "_structure.py", "ewc_file.py", "_state_table.py"):
        found = [line for line in (root / name).read_text().splitlines() if branch.search(line)]
        assert not found, (name, found)
