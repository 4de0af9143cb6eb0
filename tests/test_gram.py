"""XᵀX by its symmetry (fastewc.contract.gram, symmetric_gram) against its twin, one matmul,
and against float64: odd widths, widths not divisible by the blocks, and the Kronecker sums formed through it (the bias column, masked rows, a
one-batch call's scaled rows)."""
import numpy as np
import pytest
import tensorflow as tf

from fastewc import contract
from fastewc.rules._common import kronecker_sums


def _blocks(d, blocks):
    edges = [i * d // blocks for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("rows, d, blocks", [(9, 7, 2), (9, 7, 3), (20, 11, 4), (33, 5, 5), (6, 13, 3)])
def test_the_upper_blocks_give_x_transpose_x(rows, d, blocks):
    """Against the float64 product; the blocks off the diagonal mirror each other bit for
    bit (each lower block is its upper block's transpose)."""
    x = np.random.default_rng(rows * d).normal(size=(rows, d)).astype(np.float32)
    got = contract.symmetric_gram(tf.constant(x), blocks).numpy()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(got, x64.T @ x64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, contract.plain_gram(tf.constant(x)).numpy(), rtol=1e-5, atol=1e-5)
    for i, (lo_i, hi_i) in enumerate(_blocks(d, blocks)):
        for lo_j, hi_j in _blocks(d, blocks)[i + 1:]:
            np.testing.assert_array_equal(got[lo_j:hi_j, lo_i:hi_i], got[lo_i:hi_i, lo_j:hi_j].T)


def _matmuls(shape):
    fn = tf.function(contract.gram, autograph=False).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return sum(op.type == "MatMul" for op in fn.graph.get_operations())


def test_gram_takes_the_blocks_where_the_measured_limits_say():
    """An MLP's first layer on a 4096-row batch (4096 × 785: 3 blocks, 6 products) and a
    16384 × 289 X (2 blocks, 3 products) go by blocks; the reference MLP's 512 × 785 rows,
    the CNN's 256 × 9217 (an 85M-float A), its 147456 × 288 patches (a 170 MB X), a small
    X and a shape not known when traced by one matmul."""
    assert _matmuls((4096, 785)) == 6
    assert _matmuls((16384, 289)) == 3
    for shape in ((512, 785), (256, 9217), (147456, 288), (512, 256), (None, 785)):
        assert _matmuls(shape) == 1, shape


@pytest.fixture
def blocks_everywhere(monkeypatch):
    """gram by its upper blocks on any shape (the limits lifted)."""
    monkeypatch.setattr(contract, "SYMMETRIC_MIN_WIDTH", 1)
    monkeypatch.setattr(contract, "SYMMETRIC_MIN_MACS", 0)


def _reference_sums(rows, deltas, mask):
    """float64 a = Σ_n m_n (1/L) Σ_l ā ā^T (ā = [a, 1]) and g = Σ_kn Σ_l δ δ^T by loops."""
    n, positions, d = rows.shape
    a = np.zeros((d + 1, d + 1))
    for i in range(n):
        for l in range(positions):
            bar = np.append(rows[i, l].astype(np.float64), 1.0) * mask[i]
            a += np.outer(bar, bar) / positions
    g = np.zeros((deltas.shape[-1],) * 2)
    for k in range(deltas.shape[0]):
        for i in range(n):
            for l in range(positions):
                g += np.outer(deltas[k, i, l], deltas[k, i, l]).astype(np.float64)
    return a, g


@pytest.mark.parametrize("n, positions, d", [(5, 3, 7), (3, 2, 9)])   # rows > d', rows ≤ d' (row_gram)
def test_kronecker_sums_by_blocks_match_float64(blocks_everywhere, n, positions, d):
    """A with the bias's row and column and a padding row, and G, formed through the upper
    blocks (the tall path: the bias column from the rows' sums; the few-rows path: the
    bias column among the rows), against float64 loops."""
    rng = np.random.default_rng(n + d)
    mask = np.array([1, 1, 0, 1, 1][:n], np.float32)
    rows = rng.normal(size=(n, positions, d)).astype(np.float32) * mask[:, None, None]
    deltas = rng.normal(size=(2, n, positions, 5)).astype(np.float32)
    sums = kronecker_sums(("w", "b"), tf.constant(rows), tf.constant(deltas), tf.ones([2, n]),
                          tf.constant(mask), bias=True)
    a, g = _reference_sums(rows, deltas, mask)
    np.testing.assert_allclose(sums.a.numpy(), a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sums.g.numpy(), g, rtol=1e-5, atol=1e-5)


def test_a_one_batch_calls_scaled_rows_by_blocks(blocks_everywhere):
    """row_gram(rows, scale): √(scale / L) folded into the rows, then the blocks."""
    rows = np.random.default_rng(3).normal(size=(4, 3, 11)).astype(np.float32)
    got = contract.row_gram(tf.constant(rows), tf.constant(0.25)).numpy()
    flat = rows.reshape(-1, 11).astype(np.float64)
    np.testing.assert_allclose(got, 0.25 / 3 * flat.T @ flat, rtol=1e-5, atol=1e-6)
