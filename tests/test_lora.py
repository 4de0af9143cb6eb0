"""LoRA (Keras 3's ``enable_lora``; keras_hub's ``backbone.enable_lora(rank)``): the Fisher,
the EWC state and the penalty cover exactly the trainable variables (the LoRA factors, and
the biases of the LoRA layers), factored, against the float64 oracle; the frozen base
weights are neither stored nor moved.
"""
import warnings

import keras
import numpy as np
import pytest

import fastewc
from fastewc import testing as ft
from fastewc.ewc import _relative_path

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N = 5


@pytest.mark.parametrize("sequence", [False, True], ids=["rank2", "sequence"])
def test_lora_dense_and_einsum_dense(sequence):
    """W + (α/r)·A·B with α ≠ r (Dense) and α = r (EinsumDense), one position or several."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5, 6) if sequence else (6,))
    dense = keras.layers.Dense(7, activation="tanh")
    einsum = keras.layers.EinsumDense("...c,cd->...d", output_shape=(4,), bias_axes="d")
    out = einsum(dense(inputs))
    if sequence:
        out = keras.layers.GlobalAveragePooling1D()(out)
    model = keras.Model(inputs, out)
    dense.enable_lora(3, lora_alpha=5)
    einsum.enable_lora(2)
    rng = np.random.default_rng(4)
    for v in model.trainable_variables:            # lora_kernel_b starts at zero
        v.assign(rng.normal(size=v.shape))
    assert [v.path.split("/")[-1] for v in model.trainable_variables] == ["bias", "lora_kernel_a", "lora_kernel_b"] * 2
    x = rng.normal(size=(N,) + tuple(inputs.shape[1:])).astype("float32")
    y = np.arange(N) % 4
    fisher = fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="factored")
    ref = ft.reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    for var, got, want in zip(model.trainable_variables, fisher, ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=var.path)


@pytest.fixture(scope="module")
def lora_gpt2():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=24, num_layers=2, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16)
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(2)
    rng = np.random.default_rng(6)
    for v in lm.trainable_variables:
        v.assign(0.5 * rng.normal(size=v.shape))
    ids = rng.integers(0, 24, (3, 7)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": (np.arange(6)[None] < np.array([[6], [4], [5]])).astype("int32")}
    return lm, x, ids[:, 1:]


def test_lora_causal_lm_fisher_ewc_and_training(lora_gpt2):
    lm, x, y = lora_gpt2
    trainable = lm.trainable_variables
    # keras_hub's default LoRA targets: the query and value projections of every layer.
    assert sorted({v.path.split("/")[-1] for v in trainable}) == ["bias", "lora_kernel_a", "lora_kernel_b"]
    assert all(("/query/" in v.path or "/value/" in v.path) for v in trainable) and len(trainable) == 12

    ewc = fastewc.EWC(lm, lam=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # method="auto": factored, no fallback
        fisher = ewc.consolidate((x, y), loss=LOSS, kind="empirical", jit_compile=False)
    ref = ft.reference_fisher_of(lm, x, y, loss=LOSS, kind="empirical")
    for var, got, want in zip(trainable, fisher, ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=var.path)

    paths = [_relative_path(lm, v) for v in trainable]
    assert sorted(ewc.tracked_paths) == sorted(paths)
    assert ewc.state_bytes == 8 * sum(int(np.prod(v.shape)) for v in trainable)

    # The frozen base weights (not the dropout layers' integer seed states, which training moves).
    frozen = {v.path: v.numpy().copy() for v in lm.non_trainable_variables if "float" in str(v.dtype)}
    assert len(frozen) > 20
    step = fastewc.make_train_step(lm, keras.optimizers.SGD(0.1), LOSS, ewc=ewc, jit_compile=False)
    w = x["padding_mask"].astype("float32")
    for _ in range(2):
        step(x, y, w)
    for v in lm.non_trainable_variables:
        if v.path in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)
    state = ewc.state()
    want = 1.0 * sum(float(np.sum(state[p][0] * (v.numpy().astype(np.float64) - state[p][1]) ** 2))
                     for p, v in zip(paths, trainable))
    assert want > 0
    np.testing.assert_allclose(float(ewc.penalty()), want, rtol=1e-4)
