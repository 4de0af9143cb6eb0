"""Pairs of positions (fastewc.rules._common.position_pair_square_sum and the grouped /
depthwise form in fastewc.rules.conv) against per-example gradients formed in float64
NumPy, and against the per-example path they replace."""
import numpy as np
import pytest
import tensorflow as tf

from fastewc.rules import _common, conv


def _reference(rows, delta, weight):
    """Σ_kn w_kn (Σ_l rows_nl ⊗ δ_knl)² in float64, per example."""
    g = np.einsum("nli,knlf->knif", rows.astype(np.float64), delta.astype(np.float64))
    return np.einsum("kn,knif->if", weight.astype(np.float64), g ** 2)


@pytest.mark.parametrize("positions,k", [(1, 1), (2, 1), (5, 1), (1, 3), (4, 3)])
def test_position_pair_square_sum_matches_per_example_float64(positions, k):
    rng = np.random.default_rng(positions * 10 + k)
    rows = rng.normal(size=(6, positions, 7)).astype(np.float32)
    delta = rng.normal(size=(k, 6, positions, 5)).astype(np.float32)
    weight = rng.uniform(-0.5, 1.0, size=(k, 6)).astype(np.float32)   # any sign
    got = _common.position_pair_square_sum(tf.constant(rows), tf.constant(delta), tf.constant(weight))
    np.testing.assert_allclose(got.numpy(), _reference(rows, delta, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,c_in,filters", [(2, 6, 4), (5, 5, 10)])   # grouped; depthwise ×2
def test_grouped_pairs_equal_the_per_example_path(monkeypatch, groups, c_in, filters):
    rng = np.random.default_rng(groups)
    patches = tf.constant(rng.normal(size=(4, 2, 3, 9, c_in)).astype(np.float32))   # (N, 2×3, kk, C)
    delta = tf.constant(rng.normal(size=(3, 4, 2, 3, filters)).astype(np.float32))
    weight = tf.constant(rng.uniform(size=(3, 4)).astype(np.float32))
    results = {}
    for pairs in (True, False):
        monkeypatch.setattr(conv, "use_position_pairs", lambda *a, pairs=pairs, **kw: pairs)
        results[pairs] = conv._grouped_square_sum(patches, delta, weight, groups).numpy()
    p = patches.numpy().reshape(4, 6, 9, groups, c_in // groups).astype(np.float64)
    d = delta.numpy().reshape(3, 4, 6, groups, filters // groups).astype(np.float64)
    g = np.einsum("nlagc,knlgo->knacgo", p, d)
    reference = np.einsum("kn,knacgo->acgo", weight.numpy().astype(np.float64), g ** 2)
    np.testing.assert_allclose(results[True], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[False], reference, rtol=1e-5, atol=1e-5)


def test_use_position_pairs_needs_static_sizes_and_few_positions():
    assert _common.use_position_pairs(1, 1) and _common.use_position_pairs(8, 1)
    assert not _common.use_position_pairs(9, 1) and _common.use_position_pairs(15, 9)
    assert not _common.use_position_pairs(16, 9)
    assert not _common.use_position_pairs(None, 1) and not _common.use_position_pairs(4, None)
    assert _common.use_position_pairs(1, 1, elementwise=True)
    assert not _common.use_position_pairs(2, 1, elementwise=True)
    assert _common.use_position_pairs(17, 9, elementwise=True)
