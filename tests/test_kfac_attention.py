"""Kronecker blocks of EinsumDense layers (MultiHeadAttention's projections) against float64.

The factors against a per-example loop on a float64 twin (the definitions of
fastewc/curvature.py's docstring): each projection's input rows read off a tape as the
Jacobian of one output unit of its pre-activation w.r.t. its kernel, its deltas from one
tape per example and outcome, the kernel split by hand (query, key, value: kernel
(d_model, heads, head_dim) is a (d_model, heads·head_dim) matrix; output: (heads, head_dim,
d_model) is (heads·head_dim, d_model); the bias the last row).  The KFAC-EWC penalty and its
gradient against np.kron on those weight matrices, also after a save / load and a checkpoint
restore.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import kronecker, testing

from conftest import assert_close

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
T, D, HEADS, HEAD_DIM, N = 3, 4, 2, 2, 4
# The inputs of each projection's kernel: its leading axes (the rest are outputs).
INPUT_RANK = {"query": 1, "key": 1, "value": 1, "attention_output": 2}


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((T, D))
    attended = keras.layers.MultiHeadAttention(HEADS, HEAD_DIM, name="mha")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(attended)))


def _data():
    rng = np.random.default_rng(4)
    return rng.normal(size=(N, T, D)).astype("float32"), rng.integers(0, 3, N)


def _projections(model):
    mha = model.get_layer("mha")
    return {layer.name: layer for layer in (mha._query_dense, mha._key_dense, mha._value_dense,
                                            mha._output_dense)}


def _reference_factors(model, x, y, kind):
    """{projection name: (A, G)}, float64, per example and outcome."""
    twin = testing.float64_twin(model)
    layers = _projections(twin)
    seen = {}

    def recording(layer):
        def call(inputs):
            z = tf.einsum(layer.equation, inputs, layer.kernel) + layer.bias
            seen[layer.name] = z
            return z
        return call

    for layer in layers.values():
        object.__setattr__(layer, "call", recording(layer))
    sums = {name: [0.0, 0.0] for name in layers}
    split = {name: (int(np.prod(layer.kernel.shape[:INPUT_RANK[name]])),
                    int(np.prod(layer.kernel.shape[INPUT_RANK[name]:]))) for name, layer in layers.items()}
    try:
        for n in range(N):
            with tf.GradientTape(persistent=True) as tape:
                out = twin(x[n:n + 1].astype(np.float64))
                outcomes = testing._outcomes(LOGITS, kind, out[0], y[n], None)
                # One output unit at every position (L,): z = W̄ᵀ ā, so ∂z/∂W̄[:, 0] = ā.
                first = {name: tf.reshape(seen[name], [-1, split[name][1]])[:, 0] for name in layers}
            for name, layer in layers.items():
                d, u = split[name]
                rows = tape.jacobian(first[name], layer.kernel).numpy().reshape(-1, d, u)[:, :, 0]
                rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
                sums[name][0] += rows.T @ rows / rows.shape[0]
                for weight, target in outcomes:
                    delta = tape.gradient(target, seen[name]).numpy().reshape(-1, u)
                    sums[name][1] += weight * delta.T @ delta
            del tape
    finally:
        for layer in layers.values():
            layer.__dict__.pop("call", None)
    return {name: (a / N, g / N) for name, (a, g) in sums.items()}


@pytest.mark.parametrize("kind", ["exact", pytest.param("empirical", marks=pytest.mark.slow)])
def test_attention_projection_factors_match_float64(kind):
    model = _model()
    x, y = _data()
    result = fastewc.kfac_fisher(model, (x, y), loss=LOGITS, kind=kind, batch_size=3)  # a padded batch
    reference = _reference_factors(model, x, y, kind)
    blocks = {block.layer: block for block in result.blocks}
    assert set(blocks) == set(INPUT_RANK) | {"head"}
    for name, (a, g) in reference.items():
        assert blocks[name].input_rank == INPUT_RANK[name]
        assert_close(blocks[name].a, a)
        assert_close(blocks[name].g, g)
    covered = {id(v) for block in result.blocks for v in block.variables}
    assert all(f is None for v, f in zip(result.variables, result.diagonal) if id(v) in covered)
    assert not [v.path for v, f in zip(result.variables, result.diagonal) if f is None and id(v) not in covered]


def test_einsum_dense_without_a_kronecker_form_keeps_its_diagonal():
    """A bias over only some output axes is not a row of the weight matrix: the kernel is a
    block, the bias keeps its diagonal; a kernel axis in both input and output (per-head
    weights) has no Kronecker form: the whole layer keeps its diagonal."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((T, D))
    partial = keras.layers.EinsumDense("abc,cde->abde", (T, HEADS, HEAD_DIM), bias_axes="e", name="partial")
    per_head = keras.layers.EinsumDense("abde,de->abd", (T, HEADS), name="per_head")
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(per_head(partial(inputs)))))
    x, y = _data()
    result = fastewc.kfac_fisher(model, (x, y), loss=LOGITS, kind="exact")
    blocks = {block.layer: block for block in result.blocks}
    assert [v.path for v in blocks["partial"].variables] == ["partial/kernel"]
    assert blocks["partial"].input_rank == 1 and "per_head" not in blocks
    reference = testing.reference_fisher_of(model, x, y, loss=LOGITS, kind="exact")
    for v, mine, ref in zip(result.variables, result.diagonal, reference):
        if v.path in ("partial/bias", "per_head/kernel"):
            assert_close(mine, ref, rtol=1e-4)


def _kron_penalty(model, fisher, anchors, lam):
    """λ/2 Σ_blocks vec(ΔW̄)ᵀ (A ⊗ G) vec(ΔW̄) + λ/2 Σ F Δθ² and its gradient, float64,
    with each projection's W̄ split by hand (INPUT_RANK), the bias its last row."""
    value, grads = 0.0, {}
    covered = set()
    for block in fisher.blocks:
        kernel, bias = block.variables
        rank = INPUT_RANK.get(block.layer, 1)
        d = int(np.prod(kernel.shape[:rank]))
        diff = [np.asarray(v.numpy(), np.float64) - anchors[v.path] for v in (kernel, bias)]
        w = np.concatenate([diff[0].reshape(d, -1), diff[1].reshape(1, -1)])
        big = np.kron(np.asarray(block.a, np.float64), np.asarray(block.g, np.float64))
        value += 0.5 * lam * w.reshape(-1) @ big @ w.reshape(-1)
        grad = (lam * big @ w.reshape(-1)).reshape(w.shape)
        grads[kernel.path] = grad[:d].reshape(kernel.shape)
        grads[bias.path] = grad[d].reshape(bias.shape)
        covered |= {kernel.path, bias.path}
    for v, f in zip(fisher.variables, fisher.diagonal):
        if v.path not in covered:
            diff = np.asarray(v.numpy(), np.float64) - anchors[v.path]
            value += 0.5 * lam * np.sum(np.asarray(f, np.float64) * diff ** 2)
            grads[v.path] = lam * np.asarray(f, np.float64) * diff
    return value, grads


def _consolidated_and_moved():
    """An attention model, its KFAC EWC (λ = 3) consolidated on it, the weights then moved,
    and the float64 (value, gradients) the penalty must have (:func:`_kron_penalty`)."""
    model = _model()
    x, y = _data()
    ewc = fastewc.EWC(model, lam=3.0, curvature="kfac")
    fisher = ewc.consolidate((x, y), loss=LOGITS, kind="exact")
    assert {block.layer for block in fisher.blocks} == set(INPUT_RANK) | {"head"}
    anchors = {v.path: np.asarray(v.numpy(), np.float64) for v in model.trainable_variables}
    rng = np.random.default_rng(6)
    for v in model.trainable_variables:
        v.assign(v + 0.1 * rng.normal(size=v.shape).astype("float32"))
    return model, ewc, _kron_penalty(model, fisher, anchors, 3.0)


def _assert_penalty(model, ewc, want):
    with tf.GradientTape() as tape:
        value = ewc.penalty()
    grads = tape.gradient(value, model.trainable_variables)
    assert_close(value, want[0])
    for v, g in zip(model.trainable_variables, grads):
        assert_close(g, want[1][v.path])


def test_kfac_ewc_penalty_on_attention_matches_np_kron():
    model, ewc, want = _consolidated_and_moved()
    _assert_penalty(model, ewc, want)


@pytest.mark.slow
def test_kfac_ewc_penalty_on_attention_after_save_load_and_checkpoint(tmp_path):
    """The file and the checkpoint keep each term's anchor W̄* (d', u): the split comes back."""
    model, ewc, want = _consolidated_and_moved()
    path = str(tmp_path / "ewc.npz")
    ewc.save(path)
    _assert_penalty(model, fastewc.EWC.load(path, model), want)
    restored = fastewc.EWC(model, lam=3.0, curvature="kfac")
    tf.train.Checkpoint(ewc=restored).restore(
        tf.train.Checkpoint(ewc=ewc).save(str(tmp_path / "ckpt"))).assert_consumed()
    _assert_penalty(model, restored, want)


def test_weight_matrix_of_a_kernel_with_several_output_axes():
    rng = np.random.default_rng(7)
    kernel, bias = rng.normal(size=(4, 2, 3)), rng.normal(size=(2, 3))
    matrix = kronecker.weight_matrix([kernel, bias], input_rank=1)
    np.testing.assert_allclose(matrix, np.concatenate([kernel.reshape(4, 6), bias.reshape(1, 6)]), rtol=1e-6)
    back = kronecker.split_matrix(matrix, [(4, 2, 3), (2, 3)], input_rank=1)
    np.testing.assert_allclose(back[0], kernel, rtol=1e-6)
    np.testing.assert_allclose(back[1], bias, rtol=1e-6)
    assert kronecker.input_rank_of((4, 2, 3), 4) == 1 and kronecker.input_rank_of((4, 2, 3), 8) is None
    with pytest.raises(ValueError, match=r"`input_rank` must be None or in \[1, 2\]"):
        kronecker.weight_matrix([kernel], input_rank=3)
    with pytest.raises(ValueError, match=r"the bias\) must have shape \(2, 3\)"):
        kronecker.weight_matrix([kernel, bias.reshape(-1)], input_rank=1)


def test_dense_like_einsum_dense_has_the_dense_factors():
    """'...c,cd->...d' over positions is a Dense over positions (whose factors
    tests/test_kfac_fisher.py checks against float64): same weights, same A and G."""
    x, y = _data()

    def model(first):
        inputs = keras.Input((T, D))
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(first(inputs))))

    einsum = model(keras.layers.EinsumDense("...c,cd->...d", 5, bias_axes="d", activation="tanh", name="first"))
    dense = model(keras.layers.Dense(5, activation="tanh", name="first"))
    dense.set_weights(einsum.get_weights())
    got, want = ({b.layer: b for b in fastewc.kfac_fisher(m, (x, y), loss=LOGITS, kind="exact").blocks}
                 for m in (einsum, dense))
    assert got["first"].input_rank == 1
    assert_close(got["first"].a, want["first"].a)
    assert_close(got["first"].g, want["first"].g)
