"""Factored rules (fastewc.rules) against the independent float64 per-example reference.

Each rule is exercised inside a small multi-branch model (one compiled Fisher covers many
layer configurations), for every kind, against ``fastewc.testing.reference_fisher`` on a
float64 twin (rtol 1e-4), with ``method="loop"`` as a second opinion.  The batch size is
odd (3, so the last batch of 4 examples is padded) and 1 (N = 1 inside every rule).
"""
import inspect
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc import _keras_compat
from fastewc import capture as capture_lib
from fastewc import registry
from fastewc.rules import conv as conv_rules
from fastewc.rules import dense as dense_rules
from fastewc.rules import scale as scale_rules
from fastewc.testing import reference_fisher_of

L = keras.layers
LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
KINDS = ["empirical", "sampled", "exact"]
CLASSES = 3
N_EXAMPLES = 4
NUM_SAMPLES = 2
SEED = 7


# -- reference -------------------------------------------------------------------------
def reference(model, x, y, kind, batch_size):
    return reference_fisher_of(model, x, y, loss=LOGITS, kind=kind, num_samples=NUM_SAMPLES,
                               seed=SEED, batch_size=batch_size)


def fisher(model, x, y, kind, method="factored", batch_size=3, **kwargs):
    return fastewc.fisher_diagonal(model, (x, y), loss=LOGITS, kind=kind, method=method,
                                   batch_size=batch_size, num_samples=NUM_SAMPLES, seed=SEED,
                                   **kwargs)


def assert_matches(model, got, want, rtol=1e-4):
    variables = model.trainable_variables
    assert len(got) == len(want) == len(variables)
    for v, g, w in zip(variables, got, want):
        assert tuple(g.shape) == tuple(v.shape) == w.shape, v.path        # sizes before values
        assert g.dtype == tf.float32
        # atol: float32 rounding of entries that cancel to ~0 (relative to the variable's scale)
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=1e-6 * np.abs(w).max() + 1e-12,
                                   err_msg=v.path)


def head(*branches):
    """Flatten every branch, concatenate, one Dense to the logits."""
    flat = [L.Flatten()(b) for b in branches]
    return L.Dense(CLASSES)(flat[0] if len(flat) == 1 else L.Concatenate()(flat))


# -- problems: each covers a layer family in many configurations -------------------------
def conv2d_problem():
    """Every layer behind a 1×1 stem, so δ also back-propagates through each of them."""
    inp = keras.Input((7, 7, 8))
    stem = L.Conv2D(8, 1, activation="tanh")(inp)
    inp, first = stem, inp
    chained = L.Conv2D(8, 3, padding="valid", activation="relu")(inp)
    chained = L.Conv2D(4, 3, strides=2, padding="same")(chained)          # conv after conv
    branches = [
        chained,
        L.Conv2D(3, (2, 4), strides=(2, 3), padding="same", use_bias=False, activation="tanh")(inp),
        L.Conv2D(4, 3, dilation_rate=2, padding="same")(inp),
        L.Conv2D(4, 3, groups=2, padding="same")(inp),
        L.Conv2D(16, 3, groups=8, strides=2, padding="same")(inp),       # one channel per group
        L.Conv2D(2, 1)(inp),
        L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same")(inp),
        L.DepthwiseConv2D(3, strides=2, dilation_rate=2, use_bias=False)(inp),
        L.SeparableConv2D(4, 3, depth_multiplier=2, strides=2, padding="same", activation="tanh")(inp),
        L.SeparableConv2D(3, 2, dilation_rate=2, use_bias=False)(inp),
        L.Conv2DTranspose(3, 3, strides=2, padding="same")(inp),
        L.Conv2DTranspose(2, 3, strides=2, output_padding=1, use_bias=False)(inp),
        L.Conv2DTranspose(2, 3, padding="same", activation="relu")(inp),
    ]
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 7, 7, 8)).astype(np.float32)
    return keras.Model(first, head(*branches)), x


def conv1d_problem():
    first = keras.Input((10, 8))
    inp = L.Conv1D(8, 1)(first)
    branches = [
        L.Conv1D(4, 3, padding="causal", dilation_rate=2)(inp),
        L.Conv1D(3, 4, strides=3, padding="same", activation="relu")(inp),
        L.Conv1D(4, 3, padding="causal", strides=2, use_bias=False)(inp),
        L.Conv1D(4, 3, padding="causal", groups=2)(inp),
        L.Conv1D(8, 3, padding="causal", groups=8, dilation_rate=2)(inp),   # depthwise-shaped
        L.DepthwiseConv1D(3, depth_multiplier=2, dilation_rate=2, use_bias=False)(inp),
        L.SeparableConv1D(4, 3, strides=2, padding="same")(inp),
        L.Conv1DTranspose(3, 4, strides=3, padding="same")(inp),
    ]
    x = np.random.default_rng(1).normal(size=(N_EXAMPLES, 10, 8)).astype(np.float32)
    return keras.Model(first, head(*branches)), x


def conv3d_problem():
    first = keras.Input((4, 5, 3, 2))
    inp = L.Conv3D(2, 1, activation="tanh")(first)
    branches = [
        L.Conv3D(2, 2, strides=2, padding="same")(inp),
        L.Conv3D(2, (2, 2, 1), dilation_rate=(1, 2, 1), use_bias=False, activation="tanh")(inp),
        L.Conv3DTranspose(2, 2, strides=2, padding="same")(inp),
    ]
    x = np.random.default_rng(2).normal(size=(N_EXAMPLES, 4, 5, 3, 2)).astype(np.float32)
    return keras.Model(first, head(*branches)), x


def sequence_problem():
    """Embedding (repeated and negative ids) feeding EinsumDense and normalisations."""
    inp = keras.Input((7,), dtype="int32")
    h = L.Embedding(6, 4)(inp)                                        # (N, 7, 4)
    branches = [
        L.EinsumDense("abc,cde->abde", (7, 2, 3), bias_axes="de", activation="tanh")(h),
        L.EinsumDense("...c,cd->...d", 5, bias_axes="d")(h),
        L.EinsumDense("abc,cd->abd", (7, 5), bias_axes="b")(h),
        L.EinsumDense("abc,cd->ad", 3)(h),
        L.EinsumDense("ab,bc->ac", 4, bias_axes="c")(L.Flatten()(h)),
        L.LayerNormalization()(h),
        L.LayerNormalization(axis=[1, 2], rms_scaling=True)(h),
        L.LayerNormalization(axis=-2, center=False, epsilon=1e-2)(h),
        L.BatchNormalization()(h),
        L.GroupNormalization(groups=2)(h),
    ]
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 6, size=(N_EXAMPLES, 7)).astype(np.int32)
    x[:, 3] = x[:, 4]                                                  # a repeated token
    return keras.Model(inp, head(*branches)), x


def image_norm_problem():
    inp = keras.Input((5, 4, 6))
    h = L.BatchNormalization(scale=False)(inp)
    h = L.Conv2D(6, 2, padding="same", activation="relu")(h)
    branches = [
        L.GroupNormalization(groups=3, center=False)(h),
        L.BatchNormalization(axis=1)(h),
        L.LayerNormalization(axis=[1, 3])(h),
    ]
    x = np.random.default_rng(4).normal(size=(N_EXAMPLES, 5, 4, 6)).astype(np.float32)
    return keras.Model(inp, head(*branches)), x


def transformer_problem(classes=10):
    """Embedding + MultiHeadAttention + LayerNormalization + Dense feed-forward, pooled."""
    inp = keras.Input((6,), dtype="int32")
    h = L.Embedding(11, 8)(inp)
    h = L.LayerNormalization()(L.Add()([h, L.MultiHeadAttention(2, 4, dropout=0.1)(h, h)]))
    ff = L.Dense(8)(L.Dense(16, activation="relu")(h))                # Dense on rank-3 inputs
    h = L.LayerNormalization()(L.Add()([h, ff]))
    out = L.Dense(classes)(L.GlobalAveragePooling1D()(h))
    x = np.random.default_rng(5).integers(0, 11, size=(N_EXAMPLES, 6)).astype(np.int32)
    return keras.Model(inp, out), x


def _randomise_batch_norm(model):
    rng = np.random.default_rng(6)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))


# LayerScale (ConvNeXt) has a rule through the generic per-example contract.
LayerScale = _keras_compat.layer_scale_class()
needs_layer_scale = pytest.mark.skipif(LayerScale is None, reason="this Keras has no LayerScale")


def _with_random_gammas(model):
    """ConvNeXt initialises γ to a constant; random values make every entry differ."""
    rng = np.random.default_rng(23)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, LayerScale):
            layer.gamma.assign(rng.normal(size=layer.gamma.shape))
    return model


def layer_scale_vector_problem():
    inp = keras.Input((5,))
    h = LayerScale(0.1, 6)(L.Dense(6, activation="tanh")(inp))
    x = np.random.default_rng(20).normal(size=(N_EXAMPLES, 5)).astype(np.float32)
    return _with_random_gammas(keras.Model(inp, L.Dense(CLASSES)(h))), x


def layer_scale_image_problem():
    inp = keras.Input((5, 5, 3))
    h = LayerScale(0.1, 4)(L.Conv2D(4, 3, padding="same")(inp))
    x = np.random.default_rng(21).normal(size=(N_EXAMPLES, 5, 5, 3)).astype(np.float32)
    return _with_random_gammas(keras.Model(inp, L.Dense(CLASSES)(L.GlobalAveragePooling2D()(h)))), x


def layer_scale_sequence_problem():
    inp = keras.Input((6, 3))
    h = LayerScale(0.1, 4)(L.Dense(4, activation="tanh")(inp))          # (N, T, C)
    x = np.random.default_rng(22).normal(size=(N_EXAMPLES, 6, 3)).astype(np.float32)
    return _with_random_gammas(keras.Model(inp, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(h)))), x


PROBLEMS = {
    "conv2d": conv2d_problem,
    "conv1d": conv1d_problem,
    "conv3d": conv3d_problem,
    "sequence": sequence_problem,
    "image_norm": image_norm_problem,
}
if LayerScale is not None:
    PROBLEMS.update(layer_scale_vector=layer_scale_vector_problem,
                    layer_scale_image=layer_scale_image_problem,
                    layer_scale_sequence=layer_scale_sequence_problem)


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    keras.utils.set_random_seed(0)
    model, x = PROBLEMS[request.param]()
    _randomise_batch_norm(model)
    classes = model.output_shape[-1]
    y = np.random.default_rng(10).integers(0, classes, size=x.shape[0])
    return request.param, model, x, y, {}


def cached_reference(problem, kind, batch_size):
    _, model, x, y, cache = problem
    key = ("reference", kind, batch_size if kind == "sampled" else None)
    if key not in cache:
        cache[key] = reference(model, x, y, kind, batch_size)
    return cache[key]


def cached_fisher(problem, kind, batch_size=3):
    """The device default for XLA with ``exact`` (on for the sequence problem), off otherwise
    (XLA compiles are the slow part of these tests)."""
    _, model, x, y, cache = problem
    key = ("factored", kind, batch_size)
    if key not in cache:
        jit = None if kind == "exact" else False
        cache[key] = fisher(model, x, y, kind, batch_size=batch_size, jit_compile=jit)
    return cache[key]


# -- every rule, every kind --------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_rules_match_float64_reference(problem, kind):
    _, model, x, y, _ = problem
    assert not capture_lib.layers_without_rule(model, registry.default_rules())
    assert_matches(model, cached_fisher(problem, kind), cached_reference(problem, kind, 3))


def test_rules_with_batch_size_one(problem):
    _, model, x, y, _ = problem
    got = fisher(model, x, y, "exact", batch_size=1, jit_compile=False)
    assert_matches(model, got, cached_reference(problem, "exact", 1))


def test_rules_agree_with_the_eager_loop(problem):
    _, model, x, y, _ = problem
    got = cached_fisher(problem, "exact")
    loop = fisher(model, x, y, "exact", method="loop")
    for v, a, b in zip(model.trainable_variables, got, loop):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                   atol=1e-6 * np.abs(b.numpy()).max(), err_msg=v.path)


def test_rule_forward_and_gradients_equal_the_layers_own(problem):
    """The swapped-in forward pass is the model's forward pass (bit for bit), and its
    gradients (some rules route them through ops vectorized_map can vectorize) agree."""
    _, model, x, _, _ = problem
    x = tf.constant(x)
    r = tf.random.stateless_normal([x.shape[0], model.output_shape[-1]], seed=[1, 2])

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=False)
            total = tf.reduce_sum(out * r)
        targets = model.trainable_variables + ([x] if x.dtype.is_floating else [])
        return out, [tf.convert_to_tensor(g) for g in tape.gradient(total, targets)]

    plain, plain_grads = run()
    with capture_lib.capture(model, registry.default_rules()):
        swapped, swapped_grads = run()
    np.testing.assert_array_equal(swapped.numpy(), plain.numpy())
    for v, a, b in zip(model.trainable_variables + [x], swapped_grads, plain_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                   atol=1e-6 * np.abs(b.numpy()).max(), err_msg=getattr(v, "path", "x"))


@pytest.mark.parametrize("pairs", [True, False], ids=["all-pairs", "all-per-example"])
@pytest.mark.parametrize("name", ["conv2d", "conv1d", "layer_scale_sequence"])
def test_position_pairs_and_per_example_twins_match_reference(monkeypatch, name, pairs):
    """The rules pick pairs of positions or per-example gradients by size
    (``use_position_pairs``); forced one way for every layer, each matches float64."""
    if name not in PROBLEMS:
        pytest.skip(f"{name}: this Keras lacks a layer of it")
    def forced(positions, k, **_):
        return pairs and isinstance(positions, int) and isinstance(k, int)
    monkeypatch.setattr(conv_rules, "use_position_pairs", forced)
    monkeypatch.setattr(dense_rules, "use_position_pairs", forced)
    keras.utils.set_random_seed(0)
    model, x = PROBLEMS[name]()
    _randomise_batch_norm(model)
    y = np.random.default_rng(10).integers(0, CLASSES, size=x.shape[0])
    got = fisher(model, x, y, "exact", jit_compile=False)
    assert_matches(model, got, reference(model, x, y, "exact", 3))


def test_conv_rules_under_xla():
    keras.utils.set_random_seed(0)
    first = keras.Input((10, 8))
    inp = L.Conv1D(8, 1)(first)
    model = keras.Model(first, head(
        L.Conv1D(4, 3, padding="causal", dilation_rate=2)(inp),
        L.Conv1D(4, 2, groups=4, strides=2, padding="same")(inp),
        L.SeparableConv1D(4, 3, strides=2, padding="same")(inp),
        L.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False)(inp),
        L.Conv1DTranspose(3, 4, strides=3, padding="same")(inp)))
    x = np.random.default_rng(1).normal(size=(N_EXAMPLES, 10, 8)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    got = fisher(model, x, y, "exact", jit_compile=True)
    assert_matches(model, got, reference(model, x, y, "exact", 3))


# -- Transformer block, nested models, shared layers -------------------------------------
@pytest.fixture(scope="module")
def transformer():
    keras.utils.set_random_seed(0)
    model, x = transformer_problem()
    y = np.random.default_rng(11).integers(0, 10, size=N_EXAMPLES)
    return model, x, y


@pytest.mark.parametrize("kind,method", [("exact", "auto"), ("empirical", "factored"),
                                         ("sampled", "factored")])
def test_transformer_block_matches_reference(transformer, kind, method):
    model, x, y = transformer
    assert not capture_lib.layers_without_rule(model, registry.default_rules())       # MHA -> its EinsumDense leaves
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # auto must not fall back
        got = fisher(model, x, y, kind, method=method,       # auto: the default, XLA on CPU
                     jit_compile=None if method == "auto" else False)
    assert_matches(model, got, reference(model, x, y, kind, 3))


def test_nested_sequential_inside_functional():
    keras.utils.set_random_seed(0)
    trunk = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="relu"),
                              L.MaxPooling2D(2), L.Flatten()], name="trunk")
    inp = keras.Input((6, 6, 2))
    model = keras.Model(inp, L.Dense(CLASSES)(L.Dense(5, activation="tanh")(trunk(inp))))
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 6, 6, 2)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    assert {layer.name for layer in capture_lib.weighted_layers(model)} >= {trunk.layers[0].name}
    assert_matches(model, fisher(model, x, y, "exact", method="auto"), reference(model, x, y, "exact", 3))


def shared_layer_model():
    inp = keras.Input((6,))
    shared = L.Dense(6, activation="tanh", name="shared")
    return keras.Model(inp, L.Dense(CLASSES)(shared(shared(inp))))


def test_shared_layer_factored_raises_naming_the_layer():
    keras.utils.set_random_seed(0)
    model = shared_layer_model()
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 6)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    with pytest.raises(capture_lib.SharedLayerError, match=r"Layer 'shared' \(Dense\) is called more "
                                                           r"than once.*method='vmap'"):
        fisher(model, x, y, "exact")


def test_shared_layer_auto_warns_once_and_uses_vmap():
    keras.utils.set_random_seed(0)
    model = shared_layer_model()
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 6)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    with pytest.warns(UserWarning, match=r"'shared' \(Dense\) is called more than once.*uses 'vmap'"):
        got = fisher(model, x, y, "exact", method="auto")
    assert_matches(model, got, reference(model, x, y, "exact", 3))


# -- unsupported configurations: clear errors naming the layer ---------------------------
@pytest.mark.parametrize("layer,shape", [
    (lambda: L.Conv2D(2, 3, data_format="channels_first"), (2, 5, 5)),
    (lambda: L.DepthwiseConv1D(2, data_format="channels_first"), (2, 5)),
])
def test_channels_first_raises_naming_the_layer(layer, shape):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape), layer(), L.Flatten(), L.Dense(CLASSES)])
    x = np.zeros((2,) + shape, np.float32)
    with pytest.raises(ValueError, match=r"Layer '.*' \(\w*Conv\w*\) uses "
                                         r"data_format='channels_first'.*channels_last"):
        fisher(model, x, np.zeros(2, np.int64), "empirical")


def test_batch_norm_in_training_mode_raises():
    layer = L.BatchNormalization()
    layer.build((None, 4))
    rule = registry.get_rule(layer)
    with pytest.raises(ValueError, match=r"\(BatchNormalization\) was called with training=True"):
        rule(layer, tf.zeros([2, 4]), training=True)


# -- registry: subclasses, overwrite, errors, warn-once ----------------------------------
class PlainConv(L.Conv2D):
    """A subclass that keeps Conv2D's call: it inherits the Conv2D rule."""


class ScaledConv(L.Conv2D):
    """A subclass with its own call: the Conv2D rule does not know it."""

    def call(self, inputs):
        return 2.0 * super().call(inputs)


def test_subclass_inherits_its_base_rule_unless_it_overrides_call():
    assert registry.get_rule(PlainConv) is conv_rules.conv_rule
    assert registry.get_rule(L.Conv2D(2, 3)) is conv_rules.conv_rule
    assert registry.get_rule(ScaledConv) is None


def test_subclass_with_registered_rule_and_subclasses_false():
    def rule(layer, inputs):
        raise AssertionError("not called")

    registry.register_rule(ScaledConv, rule)
    try:
        assert registry.get_rule(ScaledConv) is rule
        assert registry.get_rule(type("Child", (ScaledConv,), {})) is rule
        registry.register_rule(ScaledConv, rule, overwrite=True, subclasses=False)
        assert registry.get_rule(ScaledConv) is rule
        assert registry.get_rule(type("Child", (ScaledConv,), {})) is None
    finally:
        assert registry.unregister_rule(ScaledConv) is rule
    assert registry.get_rule(ScaledConv) is None


def test_register_twice_raises_and_overwrite_replaces():
    with pytest.raises(ValueError, match=r"already registered for Conv2D. Pass overwrite=True"):
        fastewc.register_rule(L.Conv2D, conv_rules.conv_rule)

    def other(layer, inputs):
        return conv_rules.conv_rule(layer, inputs)

    fastewc.register_rule(L.Conv2D, other, overwrite=True)
    try:
        assert registry.get_rule(L.Conv2D) is other
    finally:
        fastewc.register_rule(L.Conv2D, conv_rules.conv_rule, overwrite=True)
    assert registry.get_rule(PlainConv) is conv_rules.conv_rule


def test_register_rule_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"`layer_class` must be a class"):
        fastewc.register_rule(L.Conv2D(2, 3), conv_rules.conv_rule)
    with pytest.raises(TypeError, match=r"`rule` must be callable"):
        fastewc.register_rule(PlainConv, "conv_rule")


def scaled_conv_model():
    return keras.Sequential([keras.Input((5, 5, 2)), ScaledConv(2, 3, name="scaled"),
                             L.Flatten(), L.Dense(CLASSES)])


def test_auto_warns_once_naming_ruleless_layers_then_is_silent():
    """A call-overriding subclass has no rule (its parent's would replace a forward pass it
    does not know): the per-layer path takes it (fastewc.generic_rule)."""
    keras.utils.set_random_seed(0)
    model = scaled_conv_model()
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 5, 5, 2)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    with pytest.warns(UserWarning, match=r"no factored Fisher rule for 'scaled' \(ScaledConv\); "
                                         r"the factored engine takes its per-example gradients"):
        got = fisher(model, x, y, "empirical", method="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher(model, x, y, "empirical", method="auto")
    assert_matches(model, got, reference(model, x, y, "empirical", 3))


def _fastewc_imports():
    """{module: the fastewc modules it imports, at module level or inside a function}, from
    the source (ast), so a lazy import inside a function counts as an edge too."""
    import ast
    import pathlib

    root = pathlib.Path(fastewc.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastewc"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("fastewc"))
        graph[name] = found
    return {name: {m for m in found if m in graph} for name, found in graph.items()}


def test_the_rule_contract_is_a_leaf_and_registry_and_rules_do_not_import_each_other():
    graph = _fastewc_imports()
    assert graph["fastewc.contract"] == set()
    for module, target in [("fastewc.registry", "fastewc.rules._common"),
                           ("fastewc.rules._common", "fastewc.registry")]:
        reached, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - reached:
                reached.add(nxt)
                todo.append(nxt)
        assert target not in reached, f"{module} imports {target}"
    assert registry.RuleOutput is fastewc.RuleOutput is fastewc.contract.RuleOutput
    assert registry.KroneckerSums is fastewc.contract.KroneckerSums
    assert registry.UnsupportedLayerError is fastewc.contract.UnsupportedLayerError


# -- shapes and precision ----------------------------------------------------------------
def test_unknown_batch_and_sequence_length():
    """A second call with other sequence lengths retraces with relaxed (None) dims."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None,), dtype="int32")
    h = L.Embedding(9, 4)(inp)
    h = L.Conv1D(4, 3, strides=2, padding="same", activation="relu")(h)
    h = L.Conv1D(4, 2, padding="causal", dilation_rate=2)(h)
    h = L.DepthwiseConv1D(2, depth_multiplier=2, padding="same")(h)
    h = L.SeparableConv1D(4, 3, padding="same", activation="tanh")(h)
    h = L.Conv1D(4, 3, groups=2, padding="same")(h)
    h = L.LayerNormalization()(L.EinsumDense("abc,cd->abd", (None, 4), bias_axes="d")(h))
    model = keras.Model(inp, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(h)))
    rng = np.random.default_rng(0)
    for length, n in ((7, 5), (10, 3)):          # the second call traces with None dims
        x = rng.integers(0, 9, size=(n, length)).astype(np.int32)
        y = np.arange(n) % CLASSES
        assert_matches(model, fisher(model, x, y, "exact", batch_size=2, jit_compile=False),
                       reference(model, x, y, "exact", 2))


def test_mixed_float16_model_gets_a_float32_fisher_close_to_float32():
    keras.utils.set_random_seed(0)

    def build(dtype):
        inp = keras.Input((6, 6, 8))
        h = L.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype)(inp)
        h = L.SeparableConv2D(4, 3, strides=2, dtype=dtype)(h)
        h = L.GroupNormalization(groups=2, dtype=dtype)(h)
        return keras.Model(inp, L.Dense(CLASSES, dtype=dtype)(L.Flatten(dtype=dtype)(h)))

    model32, model16 = build("float32"), build("mixed_float16")
    model16.set_weights(model32.get_weights())
    x = np.random.default_rng(0).normal(size=(N_EXAMPLES, 6, 6, 8)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    want = fisher(model32, x, y, "exact")
    got = fisher(model16, x, y, "exact")
    for v, g, w in zip(model16.trainable_variables, got, want):
        assert g.dtype == tf.float32 and np.all(np.isfinite(g.numpy())), v.path
        rel = np.linalg.norm(g.numpy() - w.numpy()) / np.linalg.norm(w.numpy())
        assert rel < 2e-2, (v.path, rel)


# -- the generic per-example contract (LayerScale) and the fast sum_sq override -------------
# (LayerScale against the float64 oracle: the layer_scale_* PROBLEMS above.)
@needs_layer_scale
def test_layer_scale_has_a_generic_per_example_rule():
    layer = LayerScale(0.1, 4)
    layer.build((None, 4))
    result = registry.get_rule(layer)(layer, tf.ones([2, 4]))
    assert isinstance(result, registry.RuleOutput)
    assert result.per_example is not None and result.sum_sq is None


@needs_layer_scale
def test_auto_takes_the_factored_path_for_layer_scale_without_warning():
    keras.utils.set_random_seed(0)
    model, x = layer_scale_image_problem()
    y = np.arange(N_EXAMPLES) % CLASSES
    calls = []

    def counted(layer, inputs, *args, **kwargs):
        calls.append(layer.name)
        return scale_rules.layer_scale_rule(layer, inputs, *args, **kwargs)

    fastewc.register_rule(LayerScale, counted, overwrite=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")                        # no fallback, no warning
            got = fisher(model, x, y, "exact", method="auto")
    finally:
        fastewc.register_rule(LayerScale, scale_rules.layer_scale_rule, overwrite=True)
    assert calls, "method='auto' did not run the LayerScale rule"
    assert_matches(model, got, reference(model, x, y, "exact", 3))


class ChannelAffine(L.Layer):
    """x ⊙ γ + β over the last axis: a toy layer for the two forms of the rule contract."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")
        self.beta = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.gamma + self.beta


def channel_affine_generic(layer, inputs):
    """g_kn(γ) = δ_kn ⊙ x_n, g_kn(β) = δ_kn: per-example gradients, summed by the engine."""
    outputs = ChannelAffine.call(layer, inputs)
    x = tf.cast(inputs, tf.float32)
    return registry.RuleOutput(outputs, outputs,
                               per_example=lambda d: [(layer.gamma, d * x[None]), (layer.beta, d)])


def channel_affine_fast(layer, inputs):
    """The same as a fast override: Σ_kn w_kn δ_kn² ⊙ x_n², no per-example tensor."""
    outputs = ChannelAffine.call(layer, inputs)
    x = tf.cast(inputs, tf.float32)

    def sum_sq(delta, weight):
        d2 = tf.einsum("kn,knc->nc", weight, tf.square(delta))
        return [(layer.gamma, tf.reduce_sum(d2 * tf.square(x), axis=0)),
                (layer.beta, tf.reduce_sum(d2, axis=0))]

    return registry.RuleOutput(outputs, outputs, sum_sq=sum_sq)


def fisher_with_rule(model, x, y, kind, layer_class, rule):
    """The factored Fisher with ``rule`` for ``layer_class``: through ``rules=`` where
    fisher_diagonal takes it, else registered in the default registry for the call."""
    if "rules" in inspect.signature(fastewc.fisher_diagonal).parameters:
        return fisher(model, x, y, kind, jit_compile=False,
                      rules=registry.default_rules().with_rule(layer_class, rule))
    fastewc.register_rule(layer_class, rule, overwrite=True)
    try:
        return fisher(model, x, y, kind, jit_compile=False)
    finally:
        fastewc.unregister_rule(layer_class)


@pytest.mark.parametrize("kind", KINDS)
def test_generic_per_example_contract_agrees_with_fast_sum_sq(kind):
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    model = keras.Model(inp, L.Dense(CLASSES)(ChannelAffine()(L.Dense(4, activation="tanh")(inp))))
    x = np.random.default_rng(26).normal(size=(N_EXAMPLES, 5)).astype(np.float32)
    y = np.arange(N_EXAMPLES) % CLASSES
    generic = fisher_with_rule(model, x, y, kind, ChannelAffine, channel_affine_generic)
    fast = fisher_with_rule(model, x, y, kind, ChannelAffine, channel_affine_fast)
    assert registry.get_rule(ChannelAffine) is None
    assert_matches(model, fast, [g.numpy().astype(np.float64) for g in generic], rtol=1e-5)
    assert_matches(model, generic, reference(model, x, y, kind, 3))
