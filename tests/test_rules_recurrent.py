"""Factored rules for LSTM, GRU and SimpleRNN (fastewc.rules.recurrent) against the
independent float64 per-example reference (``fastewc.testing.reference_fisher`` on a
float64 twin built with ``dtype="float64"`` and the same weights), rtol 1e-4.

Each cell type runs in one small multi-branch text model (one compiled Fisher covers many
configurations: masking, stacking, go_backwards, return_state, Bidirectional merge modes,
use_bias=False, activation variants), for the empirical and exact kinds; exact with 18
classes takes the engine's vectorized path over cotangents (K > 16), with and without XLA.
"""
import warnings

import keras
import numpy as np
import pytest

import fastewc
from fastewc import capture as capture_lib
from fastewc import registry
from fastewc.rules import recurrent
from fastewc.testing import reference_fisher, reference_sampled_labels

L = keras.layers
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
VOCAB, STEPS, DIM = 20, 5, 5
NUM_SAMPLES, SEED = 2, 7
N_EXAMPLES = 6


# -- models: each builder takes the dtype, so the float64 twin is the same graph ---------
def ids(n=N_EXAMPLES, seed=0):
    """Token ids with zero padding (masked by Embedding(mask_zero=True)): post-padding,
    a gap in the middle, a leading pad and one sequence of pads but one token."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(n, STEPS))
    x[0, 4:] = 0
    x[1, 2] = 0
    x[2, 0] = 0
    x[3, 1:] = 0
    return x


def labels(n, classes, seed=1):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def text_head(inp, branches, classes, dtype):
    merged = branches[0] if len(branches) == 1 else L.Concatenate(dtype=dtype)(branches)
    return keras.Model(inp, L.Dense(classes, dtype=dtype)(merged))


def lstm_model(classes=3, dtype=None):
    inp = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIM, mask_zero=True, dtype=dtype)(inp)
    seq = L.LSTM(4, return_sequences=True, dtype=dtype)(h)
    stacked = L.LSTM(3, go_backwards=True, dropout=0.3, dtype=dtype)(seq)      # stacked; inference
    plain = L.LSTM(4, use_bias=False, activation="relu", recurrent_activation="hard_sigmoid",
                   dtype=dtype)(h)
    out, state_h, state_c = L.LSTM(3, return_state=True, unit_forget_bias=False, dtype=dtype)(h)
    bidir = L.Bidirectional(L.LSTM(3, return_sequences=True, dtype=dtype), merge_mode="sum",
                            dtype=dtype)(h)
    bidir = L.GlobalAveragePooling1D(dtype=dtype)(bidir)
    generic = L.RNN(L.LSTMCell(3, dtype=dtype), dtype=dtype)(h)                 # keras.layers.RNN
    return text_head(inp, [stacked, plain, out, state_h, state_c, bidir, generic], classes, dtype)


def gru_model(classes=3, dtype=None):
    inp = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIM, mask_zero=True, dtype=dtype)(inp)
    seq = L.GRU(4, return_sequences=True, dtype=dtype)(h)
    stacked = L.GRU(3, reset_after=False, dtype=dtype)(seq)
    backwards = L.GRU(4, go_backwards=True, use_bias=False, activation="sigmoid", dtype=dtype)(h)
    no_bias = L.GRU(3, reset_after=False, use_bias=False, go_backwards=True, dtype=dtype)(h)
    bidir = L.Bidirectional(L.GRU(3, recurrent_activation="tanh", dtype=dtype), merge_mode="concat",
                            dtype=dtype)(h)
    bidir_seq = L.Bidirectional(L.GRU(2, return_sequences=True, reset_after=False, dtype=dtype),
                                merge_mode="ave", dtype=dtype)(h)
    bidir_seq = L.GlobalAveragePooling1D(dtype=dtype)(bidir_seq)
    return text_head(inp, [stacked, backwards, no_bias, bidir, bidir_seq], classes, dtype)


def simple_rnn_model(classes=3, dtype=None):
    inp = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIM, mask_zero=True, dtype=dtype)(inp)
    seq = L.SimpleRNN(4, return_sequences=True, dtype=dtype)(h)
    stacked = L.SimpleRNN(3, activation="relu", dtype=dtype)(seq)
    linear = L.SimpleRNN(3, activation=None, use_bias=False, go_backwards=True, dtype=dtype)(h)
    out, state = L.SimpleRNN(3, return_state=True, dtype=dtype)(h)
    fwd, bwd = L.Bidirectional(L.SimpleRNN(3, dtype=dtype), merge_mode=None, dtype=dtype)(h)
    mul = L.Bidirectional(L.SimpleRNN(2, return_sequences=True, dtype=dtype), merge_mode="mul",
                          dtype=dtype)(h)
    mul = L.GlobalAveragePooling1D(dtype=dtype)(mul)
    return text_head(inp, [stacked, linear, out, state, fwd, bwd, mul], classes, dtype)


def encoder_decoder_model(classes=3, dtype=None):
    """return_state feeding initial_state (δ reaches the encoder through the states), and a
    Masking layer on float inputs."""
    inp = keras.Input((STEPS, 3))
    masked = L.Masking(0.0, dtype=dtype)(inp)
    _, h, c = L.LSTM(4, return_state=True, dtype=dtype)(masked)
    dec = L.LSTM(4, return_sequences=True, dtype=dtype)(masked, initial_state=[h, c])
    _, g = L.GRU(3, return_state=True, go_backwards=True, dtype=dtype)(dec)
    state = L.Dense(3, activation="tanh", dtype=dtype)(g)
    top = L.SimpleRNN(3, dtype=dtype)(dec, initial_state=state)
    return text_head(inp, [top, g], classes, dtype)


def float_sequences(n=N_EXAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, STEPS, 3)).astype(np.float32)
    x[0, 4:] = 0.0
    x[1, 2] = 0.0
    x[2, 0] = 0.0
    return x


MODELS = {"lstm": lstm_model, "gru": gru_model, "simple_rnn": simple_rnn_model,
          "encoder_decoder": encoder_decoder_model}


def pair(build, classes):
    """(float32 model, its float64 twin with the same weights)."""
    model = build(classes)
    twin = build(classes, dtype="float64")
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return model, twin


def inputs(name, n=N_EXAMPLES):
    return float_sequences(n) if name == "encoder_decoder" else ids(n)


def reference(twin, x, y, kind, batch_size):
    sampled = None
    if kind == "sampled":
        sampled = reference_sampled_labels(twin, x, loss=LOGITS, num_samples=NUM_SAMPLES, seed=SEED,
                                           batch_size=batch_size)
    return reference_fisher(twin, x, y, loss=LOGITS, kind=kind, sampled_labels=sampled)


def fisher(model, x, y, kind, jit_compile=False, batch_size=N_EXAMPLES, method="factored"):
    return fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind=kind, method=method,
                                   batch_size=batch_size, num_samples=NUM_SAMPLES, seed=SEED,
                                   jit_compile=jit_compile)


def assert_matches(model, got, want, rtol=1e-4):
    variables = model.trainable_variables
    assert len(got) == len(want) == len(variables)
    for v, g, w in zip(variables, got, want):
        assert tuple(g.shape) == tuple(v.shape) == w.shape, v.path
        scale = np.abs(w).max()
        assert scale > 0, v.path                        # every weight is reached
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=rtol * scale, err_msg=v.path)


# -- against the float64 reference -------------------------------------------------------
def small_mixed_model(classes, dtype=None):
    inp = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIM, mask_zero=True, dtype=dtype)(inp)
    a = L.LSTM(3, return_sequences=True, dtype=dtype)(h)
    a = L.GRU(3, go_backwards=True, dtype=dtype)(a)
    b = L.Bidirectional(L.SimpleRNN(2, return_sequences=True, dtype=dtype), dtype=dtype)(h)
    b = L.GlobalAveragePooling1D(dtype=dtype)(b)
    c = L.GRU(2, reset_after=False, dtype=dtype)(h)
    return text_head(inp, [a, b, c], classes, dtype)


MODELS["small_mixed"] = small_mixed_model
_CACHE = {}


def problem(name, classes, kind, n=N_EXAMPLES, batch_size=N_EXAMPLES):
    """(model, x, y, float64 reference), made once per module for each argument set."""
    key = (name, classes, kind, n, batch_size)
    if key not in _CACHE:
        models = _CACHE.setdefault((name, classes), pair(MODELS[name], classes))
        x, y = inputs(name, n), labels(n, classes, seed=n)
        _CACHE[key] = (models[0], x, y, reference(models[1], x, y, kind, batch_size))
    return _CACHE[key]


# Every layer variant of the lstm, gru and simple_rnn models against float64 in the empirical
# kind (one cotangent: half the trace); the rules' K > 1 path is the exact kind of
# encoder_decoder (an LSTM, a GRU and a SimpleRNN) and of the 18-class small_mixed model, so
# the other models' exact kind is `slow`, and so is encoder_decoder's empirical kind (its
# initial states and Masking run through the same rules in its exact kind, and the one-
# cotangent path of each cell type in the three models above).
@pytest.mark.parametrize("name, kind", [("lstm", "empirical"), ("gru", "empirical"),
                                        ("simple_rnn", "empirical"), ("encoder_decoder", "exact"),
                                        pytest.param("encoder_decoder", "empirical", marks=pytest.mark.slow),
                                        pytest.param("simple_rnn", "exact", marks=pytest.mark.slow),
                                        pytest.param("lstm", "exact", marks=pytest.mark.slow),
                                        pytest.param("gru", "exact", marks=pytest.mark.slow)])
def test_matches_float64_reference(name, kind):
    model, x, y, want = problem(name, 3, kind)
    assert_matches(model, fisher(model, x, y, kind), want)


def test_sampled_kind_matches_reference():
    model, x, y, want = problem("small_mixed", 3, "sampled", batch_size=4)
    assert_matches(model, fisher(model, x, y, "sampled", batch_size=4), want)


@pytest.mark.parametrize("jit_compile", [True])      # without XLA: the same vectorized_map
def test_exact_with_many_classes_vectorizes_over_cotangents(jit_compile):
    """18 classes: K = 18 > 16 cotangents, one tf.vectorized_map over them (with XLA: always)
    through the recurrence's while loop and its own backward loop."""
    model, x, y, want = problem("small_mixed", 18, "exact", n=4, batch_size=4)   # 4: every padding pattern
    assert_matches(model, fisher(model, x, y, "exact", jit_compile=jit_compile, batch_size=4), want)


def test_second_call_with_another_number_of_examples():
    model, _, _, _ = problem("small_mixed", 3, "empirical")
    for n in (N_EXAMPLES, 5):
        _, x, y, want = problem("small_mixed", 3, "empirical", n=n)
        assert_matches(model, fisher(model, x, y, "empirical", batch_size=None), want)


def test_rule_outputs_equal_the_layers_own():
    """The rule's forward pass is the layer's (every output structure, mask, state)."""
    for build in (lstm_model, gru_model, simple_rnn_model, encoder_decoder_model):
        model = build()
        x = float_sequences() if build is encoder_decoder_model else ids()
        want = model(x, training=False).numpy()
        with capture_lib.capture(model, fastewc.default_rules()) as recorder:
            got = model(x, training=False).numpy()
        assert recorder.records
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- method="auto" -----------------------------------------------------------------------
def text_classifier():
    return keras.Sequential([keras.Input((STEPS,), dtype="int32"),
                             L.Embedding(VOCAB, DIM, mask_zero=True),
                             L.LSTM(4), L.Dense(3)])


def test_auto_picks_factored_without_warning_for_an_lstm_classifier():
    model = text_classifier()
    x, y = ids(), labels(N_EXAMPLES, 3)
    estimator = fastewc.FisherEstimator(model, loss=LOGITS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert estimator.plan((x, y)).method == "factored"


class ScaledCell(L.SimpleRNNCell):
    def call(self, sequence, states, training=False):
        out, new = super().call(sequence, states, training=training)
        return 2 * out, new


def stateful_model():
    # Batch size 1: the estimator's planning passes run one example through the model.
    return keras.Sequential([keras.Input((STEPS,), dtype="int32", batch_size=1),
                             L.Embedding(VOCAB, DIM), L.LSTM(4, stateful=True, name="remembering"),
                             L.Dense(3)])


def custom_cell_model():
    return keras.Sequential([keras.Input((STEPS,), dtype="int32"), L.Embedding(VOCAB, DIM),
                             L.RNN(ScaledCell(4), name="remembering"), L.Dense(3)])


def stacked_cells_model():
    return keras.Sequential([keras.Input((STEPS,), dtype="int32"), L.Embedding(VOCAB, DIM),
                             L.RNN([L.LSTMCell(3), L.LSTMCell(3)], name="remembering"), L.Dense(3)])


@pytest.mark.parametrize("build, what", [(stateful_model, "stateful"), (custom_cell_model, "ScaledCell"),
                                         (stacked_cells_model, "StackedRNNCells")])
def test_unsupported_configuration_auto_warns_naming_the_layer(build, what):
    model = build()
    x, y = ids(), labels(N_EXAMPLES, 3)
    with pytest.warns(UserWarning, match="remembering") as caught:
        assert fastewc.FisherEstimator(model, loss=LOGITS).plan((x, y)).method == "vmap"
    assert any(what in str(w.message) for w in caught)
    with pytest.raises(registry.UnsupportedLayerError, match="remembering"):
        fastewc.FisherEstimator(model, loss=LOGITS, method="factored").plan((x, y))


def test_dropout_in_training_mode_raises():
    """The engine runs the model with training=False; a rule called in training mode with
    dropout refuses rather than computing the Fisher of a different function."""
    layer = L.LSTM(4, dropout=0.5, name="remembering")
    x = np.zeros((2, STEPS, 3), np.float32)
    layer(x)
    with pytest.raises(registry.UnsupportedLayerError, match="remembering.*training=True"):
        recurrent.recurrent_rule(layer, x, training=True)
    recurrent.recurrent_rule(layer, x, training=False)
