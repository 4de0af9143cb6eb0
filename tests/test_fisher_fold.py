"""How a call turns its batches' float32 sums into the mean (fastewc.engines.base: mean,
fold, finish): a one-batch call in float32 inside the batch's compiled function, a call of
several batches through float64 totals.  Each against a float64 NumPy reference."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.engines import base
from fastewc.engines.base import all_finite
from fastewc.testing import float64_twin, reference_fisher, reference_kronecker_factors

from conftest import data, mlp

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CALLS = ("PartitionedCall", "StatefulPartitionedCall")     # a call of a traced function


def _float64_tensors(graph):
    """The ops of ``graph`` with a float64 output larger than a scalar (the examples
    counter is a float64 scalar)."""
    return [op.name for op in graph.get_operations()
            if any(t.dtype == tf.float64 and t.shape.rank != 0 for t in op.outputs)]


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_a_one_batch_call_matches_float64_without_any_float64(curvature):
    """One batch: the mean is sums / count in float32, formed in the batch's own compiled
    function; no op of it has a float64 tensor output, and the result is within float32
    rounding of the float64 reference."""
    model = mlp()
    x, y = data(n=13)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", curvature=curvature)
    got = estimator((x, y))
    if curvature == "kfac":           # the first layer's A = (1/N) Σ_n [x_n, 1][x_n, 1]ᵀ
        rows = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], 1)
        np.testing.assert_allclose(got.blocks[0].a.numpy(), rows.T @ rows / len(x), rtol=1e-6, atol=1e-7)
    else:
        want = reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="exact")
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-10)
    engine = estimator.plan((x, y)).engine
    assert engine._concrete, "the call ran through a compiled function"
    for concrete in engine._concrete.values():
        assert _float64_tensors(concrete.graph) == []
    assert not engine._steps          # no second function: no fold, no finish


@pytest.mark.parametrize("curvature", ["diagonal", "kfac"])
def test_a_many_batch_call_accumulates_in_float64(curvature):
    """64 batches of one example: x = 2^12, then 63 ones.  F(w) = mean x² for a linear
    Dense(1) under a unit-variance Gaussian (exact kind: the cotangent is 1), and for KFAC
    A = mean x², G = 1.  A float32 running total would stay at 2^24 (each +1 rounds away,
    a relative error of 3.8e-6 in the mean); the float64 totals keep every batch, so the
    mean is within one float32 rounding of the exact (2^24 + 63) / 64."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    x = np.ones((64, 1), np.float32)
    x[0, 0] = 2.0**12
    y = np.zeros((64, 1), np.float32)
    want = np.mean(x.astype(np.float64) ** 2)
    estimator = fastewc.FisherEstimator(model, loss="mse", kind="exact", batch_size=1, curvature=curvature)
    got = estimator((x, y))
    if curvature == "kfac":
        (block,) = got.blocks
        np.testing.assert_allclose(block.a.numpy(), [[want]], rtol=1e-7)
        np.testing.assert_allclose(block.g.numpy(), [[1.0]], rtol=1e-7)
    else:
        np.testing.assert_allclose(got[0].numpy(), [[want]], rtol=1e-7)
    # the same data as a dataset of unknown length: the batches are read one ahead
    stream = tf.data.Dataset.from_tensor_slices((x, y)).batch(1).filter(lambda a, b: True)
    again = estimator(stream)
    first = again.blocks[0].a if curvature == "kfac" else again[0]
    np.testing.assert_allclose(first.numpy(), [[want]], rtol=1e-7)


def _running_ops(concrete):
    """The ops the outputs of ``concrete`` depend on: what a call runs (the function's
    runtime prunes the rest, e.g. a rule's unscaled factor that nothing reads), followed
    into the functions it calls (the rules' sums traced once per layer signature,
    fastewc.engines.shared_sums; a rule traced once per cotangent, blocks.kronecker): of a
    call, the body's ops that the outputs read are followed, output by output."""
    seen, stack = {}, []

    def reach(graph, t):
        stack.append((graph, t.op))
        if t.op.type in CALLS:             # that output of the call: its body's output
            body = graph._get_function(t.op.get_attr("f").name).graph
            stack.append((body, body.outputs[t.value_index].op))

    for t in concrete.outputs:
        reach(concrete.graph, t)
    while stack:
        graph, op = stack.pop()
        if (id(graph), op.name) not in seen:
            seen[(id(graph), op.name)] = op
            for t in op.inputs:
                reach(graph, t)
            for c in op.control_inputs:
                stack.append((graph, c))
                if c.type in CALLS:        # a call waited for: all it computes
                    body = graph._get_function(c.get_attr("f").name).graph
                    stack.extend((body, t.op) for t in body.outputs)
    return list(seen.values())


def _conv_dense():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(3, 2, activation="tanh"),       # A 9², from 6 · 9 patches: A · 1/N
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh"),            # A 28², from 8 rows: 1/N in the rows
        keras.layers.Dense(3),                               # A 5², from 8 rows: A · 1/N
    ])


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_a_one_batch_call_forms_a_large_factor_by_its_matmul_alone(kind):
    """A one-batch call's Kronecker sums come as means: 1/N folded into the weights (G)
    and, where the rows are fewer floats than A, into the rows (Dense(27 → 4) on 8 rows,
    A 28²), else A · 1/N (the convolution's patches, the last Dense).  Against float64,
    with 2 padding rows (6 examples in 8 rows); and in the graph that runs, the only op
    with an output of the large A's shape is its matmul: no division and no finiteness
    pass over A (its diagonal is checked: engines.base.all_finite)."""
    model = _conv_dense()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind=kind, curvature="kfac", batch_size=8)
    got = estimator((x, y))
    reference = reference_kronecker_factors(float64_twin(model), x, y, loss=LOGITS, kind=kind)
    for block in got.blocks:
        a, g = reference[block.layer]
        np.testing.assert_allclose(block.a.numpy(), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.g.numpy(), g, rtol=1e-5, atol=1e-7)
    engine = estimator.plan((x, y)).engine
    (rows, alone), = engine._concrete
    assert (rows, alone) == (8, True)
    large = [op.type for op in _running_ops(engine._concrete[(rows, alone)])
             if op.type not in ("Identity", *CALLS) and any(t.shape == (28, 28) for t in op.outputs)]
    assert large == ["MatMul"]


def test_a_non_finite_factor_still_raises_naming_it():
    """The finiteness check of a Gram factor reads its diagonal: a mean that overflows
    float32 in A (x = 1e20 in one of 5 rows: x²/5 = 2e39) shows there, and the call raises
    naming A.  (x = 3e19 no longer raises: x²/5 = 1.8e38 is finite, and with the 1/N in
    the rows no sum overflows on the way.)"""
    model = mlp(d_in=30)
    x, y = data(n=5, d_in=30)
    x[2, 7] = 1e20
    with pytest.raises(ValueError, match=r"dense(_\d+)?/kernel \(Kronecker factor A\)' is not finite"):
        fastewc.FisherEstimator(model, loss=LOGITS, kind="exact", curvature="kfac")((x, y))


def test_a_gram_matrix_is_finite_where_its_diagonal_is():
    """all_finite's diagonal check of A = XᵀX agrees with a check of every entry, for rows
    with a NaN, an inf, a finite value whose square overflows, and none (float32 matmul,
    each case against NumPy's isfinite of the whole product)."""
    rng = np.random.default_rng(2)
    for bad in (None, np.nan, np.inf, -np.inf, 2e19, 1e19):
        x = rng.normal(size=(7, 5)).astype(np.float32)
        if bad is not None:
            x[rng.integers(7), rng.integers(5)] = bad
        a = tf.matmul(x, x, transpose_a=True)
        full = bool(np.all(np.isfinite(a.numpy())))
        assert bool(all_finite((a,), (True,))) == full, bad
        assert bool(all_finite((a, tf.constant([np.nan])), (True,))) is False


@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_finite_flag_sees_every_entry_of_small_and_large_sums(jit_compile):
    """``checks.finite`` of a one-batch call's mean is False as soon as ONE entry of one sum
    is inf or NaN, whether that sum is small (checked with the other small ones, together)
    or large (checked alone), and True when every entry is finite; compiled as the engines
    compile it, with and without XLA."""
    from fastewc.engines import base
    large = base.FINITE_TOGETHER_FLOATS + 3
    shapes = [(3, 4), (5,), (large,), (2, 2)]
    batch_range = tf.constant([0.0, 1.0])
    mean = tf.function(base.mean, jit_compile=jit_compile, autograph=False)

    def finite(sums):
        batch = base.BatchSums((tuple(tf.constant(s) for s in sums),), [], batch_range)
        state = mean(batch, tf.constant(2, tf.int32), base.initial_state())
        return base.Checks.read(state.checks).finite

    rng = np.random.default_rng(0)
    sums = [rng.random(shape, dtype=np.float32) * 1e30 for shape in shapes]   # large, still finite
    assert finite(sums)
    for index in range(len(shapes)):
        for bad in (np.inf, -np.inf, np.nan):
            corrupted = [s.copy() for s in sums]
            corrupted[index].reshape(-1)[-1] = bad
            assert not finite(corrupted), (index, bad)


def _exact_factors_match_float64(model, x, y):
    """The exact kind's Kronecker factors of a softmax ``model`` on 6 examples in rows of 8
    (2 padding rows) against float64; returns the engine that formed them."""
    loss = keras.losses.SparseCategoricalCrossentropy()
    estimator = fastewc.FisherEstimator(model, loss=loss, kind="exact", curvature="kfac", batch_size=8)
    got = estimator((x, y))
    reference = reference_kronecker_factors(float64_twin(model), x, y, loss=loss, kind="exact")
    for block in got.blocks:
        a, g = reference[block.layer]
        np.testing.assert_allclose(block.a.numpy(), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.g.numpy(), g, rtol=1e-5, atol=1e-7)
    return estimator.plan((x, y)).engine


def test_the_kronecker_sums_weigh_no_deltas():
    """The factored engine folds √w into the cotangents (engines.base.folded_weights), so a
    rule's Kronecker sums weigh no deltas: probabilities out (exact kind: K = 3 outcomes
    weighted by p_c) and 2 padding rows (weight 0; 6 examples in 8 rows), and no op that
    runs multiplies a layer's deltas (K, N, L, u) by anything.  Both factors against float64."""
    model = _conv_dense()
    model.layers[-1].activation = keras.activations.softmax
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    engine = _exact_factors_match_float64(model, x, y)
    (concrete,) = engine._concrete.values()
    deltas = {(3, 8, 9, 3), (3, 8, 1, 4), (3, 8, 1, 3)}      # the conv's 9 positions, the Dense layers'
    weighing = [op.name for op in _running_ops(concrete)
                if op.type == "Mul" and tuple(op.outputs[0].shape) in deltas]
    assert weighing == []


def test_unrolled_cotangents_reach_the_kronecker_sums_unstacked():
    """With the K backward passes unrolled (a max pooling: engines.factored
    unroll_cotangents), a Kronecker block takes each cotangent's deltas apart
    (Block.per_cotangent): G = Σ_k δ_kᵀδ_k, one matmul per cotangent, and no op that runs
    stacks the deltas into (K, N, ...).  Both factors against float64, exact kind (K = 3
    outcomes weighted by p_c), with 2 padding rows."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 2, activation="tanh"),       # deltas (N, 4, 4, 3)
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 5, 5, 2)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    engine = _exact_factors_match_float64(model, x, y)
    assert engine.unroll_cotangents
    (concrete,) = engine._concrete.values()
    stacks = [op.name for op in _running_ops(concrete)
              if op.type == "Pack" and tuple(op.outputs[0].shape) in {(3, 8, 4, 4, 3), (3, 8, 3)}]
    assert stacks == []


def _two_inputs():
    """out = Dense(3)(x1) + Dense(3)(x2): linear, so under a unit-variance Gaussian (MSE,
    exact kind: the cotangents are the 3 unit vectors) F(W_a)_ij = mean_n x_a,ni² and
    F(b_a) = 1, every square exact in float32 for powers of two."""
    keras.utils.set_random_seed(0)
    x1, x2 = keras.Input((4,)), keras.Input((2,))
    out = keras.layers.Add()([keras.layers.Dense(3)(x1), keras.layers.Dense(3)(x2)])
    return keras.Model([x1, x2], out)


def test_many_one_row_batches_fold_small_and_large_sums_in_float64(monkeypatch):
    """64 batches of one example, entries powers of two spread over 2^-9 .. 2^12 (each
    batch's sums exact in float32), with sums folded together (the biases) and alone (the
    kernels, above a threshold lowered to 5 floats): every mean within one float32
    rounding of the float64 closed form; a float32 running total would drift (the 2^24
    of the first row swallows the later rows' squares)."""
    monkeypatch.setattr(base, "FINITE_TOGETHER_FLOATS", 5)
    rng = np.random.default_rng(0)
    x1 = (2.0 ** rng.integers(-9, 4, size=(64, 4))).astype(np.float32)
    x2 = (2.0 ** rng.integers(-9, 4, size=(64, 2))).astype(np.float32)
    x1[0, 0] = 2.0**12
    y = np.zeros((64, 3), np.float32)
    estimator = fastewc.FisherEstimator(_two_inputs(), loss="mse", kind="exact", batch_size=1)
    got = estimator(((x1, x2), y))
    for value, x in zip(got[::2], (x1, x2)):                      # the kernels
        want = np.repeat(np.mean(x.astype(np.float64) ** 2, 0)[:, None], 3, 1)
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-7)
    for value in got[1::2]:                                       # the biases
        np.testing.assert_allclose(value.numpy(), np.ones(3), rtol=1e-7)


def test_a_call_of_several_batches_folds_the_small_sums_as_one_vector():
    """The step functions of a call of several batches: one fold for every batch (the
    first starts from scalar zeros) and one finish; the fold casts the small sums to
    float64 once, as one flat vector (not once per sum), and the finish divides once."""
    model = mlp()
    x, y = data(n=8)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS, kind="empirical", batch_size=4)
    got = estimator((x, y))
    want = reference_fisher(float64_twin(model), x, y, loss=LOGITS, kind="empirical")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-10)
    engine = estimator.plan((x, y)).engine
    assert sorted(engine._steps) == ["finish", "fold"]

    def count(graph, op_type):
        return sum(op.type == op_type and op.outputs[0].dtype == tf.float64 and op.outputs[0].shape.rank != 0
                   for op in graph.get_operations())
    assert count(engine._steps["fold"].graph, "Cast") == 1       # 5 sums, one flat vector
    assert count(engine._steps["finish"].graph, "RealDiv") == 1
