"""A Kronecker block's G from the K cotangents' deltas apart (the factored engine's unrolled
backward passes, fastewc.blocks.kronecker.per_cotangent_sums): the rule's ``kron`` traced
ONCE per layer and called K times, G = Σ_k G_k, against float64 references."""
import collections

import keras
import numpy as np
import tensorflow as tf

import fastewc
from fastewc.blocks.kronecker import Kronecker
from fastewc.rules.conv import conv_rule
from fastewc.testing import float64_twin, reference_kronecker_factors

SOFTMAX_LOSS = keras.losses.SparseCategoricalCrossentropy()


def _counting(rule, calls):
    """``rule`` with its ``kron`` counted per layer in ``calls``: one count per Python call
    (a trace, in a traced function)."""
    def counted(layer, inputs, *args, **kwargs):
        result = rule(layer, inputs, *args, **kwargs)

        def kron(delta, weight, mask):
            calls[layer.name] += 1
            return result.kron(delta, weight, mask)
        return result._replace(kron=kron)
    return counted


def test_unrolled_cotangents_trace_each_layers_rule_once():
    """Exact kind, 4 classes, a max pooling (the K passes unrolled): the batch function's
    trace calls each layer's ``kron`` once, not once per cotangent (K = 4 calls a layer
    before), and both factors match float64, with 2 padding rows (6 examples in 8 rows)."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 2, activation="tanh"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(4, activation="softmax"),
    ])
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 5, 5, 2)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    calls = collections.Counter()
    defaults = fastewc.default_rules()
    rules = defaults
    for cls in (keras.layers.Conv2D, keras.layers.Dense):
        rules = rules.with_rule(cls, _counting(defaults[cls], calls))
    estimator = fastewc.FisherEstimator(model, loss=SOFTMAX_LOSS, kind="exact", curvature="kfac",
                                        batch_size=8, rules=rules)
    plan = estimator.plan((x, y))
    engine = plan.engine
    assert engine.unroll_cotangents
    calls.clear()                                   # the plan's eager pass called each once
    got = estimator((x, y))
    assert len(engine._concrete) == 1               # one trace of the batch function
    assert engine._vectorized is False
    assert dict(calls) == {layer.name: 1 for layer in model.layers if layer.trainable_weights}
    reference = reference_kronecker_factors(float64_twin(model), x, y, loss=SOFTMAX_LOSS, kind="exact")
    for block in got.blocks:
        a, g = reference[block.layer]
        np.testing.assert_allclose(block.a.numpy(), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.g.numpy(), g, rtol=1e-5, atol=1e-7)


def test_per_cotangent_g_weighs_each_cotangent_by_its_row():
    """Kronecker.rule_sums on a convolution's deltas as a list of K = 4 cotangents with
    weights that are not statically 1 (p_c: each example's class probabilities, a padding
    row weighted 0) and a one-batch call's scale 1/N, traced as the engine traces it:

        G = s Σ_k Σ_n p_kn Σ_l δ_knl δ_knlᵀ,     A = s Σ_n (1/L) Σ_l ā_nl ā_nlᵀ

    (ā the 2×2 patches of the masked input with the bias's 1), both against float64 NumPy,
    and the rule's ``kron`` called once for the K cotangents."""
    k, n, s = 4, 4, 0.25
    rng = np.random.default_rng(8)
    layer = keras.layers.Conv2D(3, 2)
    layer.build((None, 5, 5, 2))
    x = rng.normal(size=(n, 5, 5, 2)).astype(np.float32)
    deltas = rng.normal(size=(k, n, 4, 4, 3)).astype(np.float32)
    logits = rng.normal(size=(n, k))
    p = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).T.astype(np.float32)     # (K, N)
    mask = np.array([1, 1, 1, 0], np.float32)
    p[:, 3] = 0.0
    calls = collections.Counter()

    @tf.function(autograph=False)
    def sums(x, deltas, weight, mask):
        result = _counting(conv_rule, calls)(layer, x)
        return Kronecker.rule_sums(result, [deltas[i] for i in range(k)], weight, mask, scale=tf.constant(s))

    (a, g), = sums(x, deltas, p, mask).values()
    assert calls == {layer.name: 1}
    d64 = deltas.astype(np.float64).reshape(k, n, 16, 3)
    want_g = s * np.einsum("kn,knlu,knlv->uv", p.astype(np.float64), d64, d64)
    np.testing.assert_allclose(g.numpy(), want_g, rtol=1e-5, atol=1e-6)
    x64 = x.astype(np.float64) * mask[:, None, None, None]
    patches = np.stack([x64[:, i:i + 4, j:j + 4, :] for i in range(2) for j in range(2)], axis=3)   # (N, 4, 4, 4, C)
    rows = np.concatenate([patches.reshape(n, 16, 8), np.broadcast_to(mask[:, None, None], (n, 16, 1))], -1)
    want_a = s * np.einsum("nli,nlj->ij", rows, rows) / 16
    np.testing.assert_allclose(a.numpy(), want_a, rtol=1e-5, atol=1e-6)
