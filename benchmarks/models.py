"""Real models for ``benchmarks/bench_models.py``: builders, synthetic data, sizes.

Every model classifies into 10 classes and outputs logits (``LOSS`` is
``SparseCategoricalCrossentropy(from_logits=True)``); weights are random (``weights=None``).

* Keras Applications at 32×32×3, ``classes=10``, ``classifier_activation=None`` (logits):
  MobileNetV2, MobileNetV3Small, EfficientNetB0, ResNet50, DenseNet121, ConvNeXtTiny.
  ``include_preprocessing`` keeps its default (True where the model has it: MobileNetV3,
  EfficientNet, ConvNeXt), so those get pixels in [0, 255]; the others get [-1, 1].
  BatchNorm calibration: an untrained Application with its initial BatchNorm moving
  statistics (mean 0, variance 1) outputs exactly uniform probabilities, and its Fisher
  is ~1e-28 below the head (every BN scales the activations down).  :func:`calibrate`
  therefore sets each BatchNormalization's moving mean and variance to the statistics of
  one real batch (``CALIBRATION`` synthetic images, one ``training=True`` pass with
  ``momentum=0``, so moving = batch statistics; the momentum is then restored).  The
  Fisher passes run with ``training=False`` as always.
* Text (64 tokens, vocabulary 1000, Embedding width 64): ``lstm`` and ``gru``
  (Embedding → LSTM/GRU(64) → Dense), ``conv1d`` (Embedding → Conv1D(128, 5) →
  GlobalMaxPool → Dense), ``transformer`` (:func:`benchmarks.problems.transformer`:
  Embedding + MultiHeadAttention + LayerNorm + Dense).
* keras_hub (needs ``keras_hub``; :func:`make` raises ImportError without it): ``bert``
  (BertBackbone, 2 layers, 2 heads, hidden 64, intermediate 128, vocabulary 1000, 64
  tokens, random lengths ≥ 32 with their padding mask; Dense(10) on ``pooled_output``)
  and ``gpt2`` (GPT2Backbone, same sizes, full-length sequences; Dense(10) on the last
  token, as GPT-2 classifiers read it).  Inputs are dicts.
* keras_hub causal LM, per token: ``gpt2_lm`` (``GPT2CausalLM(GPT2Backbone(same sizes),
  preprocessor=None)``, tied input/output embeddings; output (N, 64, 1000) logits).  Labels
  are the next tokens, (N, 64): the inputs shifted by one, a random last token; random
  lengths >= 32 with their padding mask, as :func:`_bert_inputs`.  Its kinds
  (``Spec.kinds``) are empirical and sampled: exact would take one backward pass per
  vocabulary entry and position (K = 1000 · 64).

Sizes: ``SPECS[name].examples`` for the benchmarks (one steady Fisher call takes a
fraction of a second to a few seconds on a 2-core CPU).  ``small=True`` is the smoke
pass: ``SMOKE_EXAMPLES`` examples, text of ``SMOKE_LENGTH`` tokens (short: cheap to trace), MobileNetV3Small with
``alpha=0.75, minimalistic=True``; the other Applications are not smoked (see
:data:`SMOKED`; bench_models.py says why).
"""
import typing

import keras
import numpy as np

from benchmarks import problems

CLASSES = 10
LOSS = problems.LOSS
IMAGE = (32, 32, 3)
VOCAB, LENGTH, WIDTH = 1000, 64, 64
SMOKE_LENGTH = 8         # tokens per sequence in the smoke pass
CALIBRATION = 32          # images in the BatchNorm calibration batch
SMOKE_EXAMPLES = 2


class Spec(typing.NamedTuple):
    build: typing.Callable          # build(small) -> keras.Model
    examples: int                   # normal size
    sample_x: typing.Callable       # sample_x(rng, n, length) -> inputs (length: tokens)
    family: str                     # "application", "text" or "hub"
    sample_y: typing.Callable = None  # sample_y(rng, x) -> labels; None: one of CLASSES each
    kinds: tuple = None             # the Fisher kinds benchmarked; None: bench_models.KINDS


# -- Keras Applications -------------------------------------------------------------------
def _application(name, **kwargs):
    def build(small):
        cls = getattr(keras.applications, name)
        extra = dict(kwargs)
        if small and name == "MobileNetV3Small":
            extra.update(alpha=0.75, minimalistic=True)
        return cls(input_shape=IMAGE, weights=None, classes=CLASSES, classifier_activation=None, **extra)
    return build


def _images(low, high):
    return lambda rng, n, length=None: rng.uniform(low, high, size=(n,) + IMAGE).astype(np.float32)


def calibrate(model, images):
    """Set every BatchNormalization's moving mean/variance to the statistics of ``images``
    (one ``training=True`` pass with momentum 0; momenta restored).  Returns the number of
    BatchNormalization layers set."""
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return 0
    momenta = [layer.momentum for layer in norms]
    try:
        for layer in norms:
            layer.momentum = 0.0
        model(images, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return len(norms)


def _all_layers(model):
    out, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        out.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return out


# -- text ----------------------------------------------------------------------------------
def _recurrent(cls):
    def build(small):
        tokens = keras.Input((_length(small),), dtype="int32")
        h = keras.layers.Embedding(VOCAB, WIDTH)(tokens)
        h = cls(64)(h)
        return keras.Model(tokens, keras.layers.Dense(CLASSES)(h), name=cls.__name__.lower())
    return build


def _conv1d(small):
    tokens = keras.Input((_length(small),), dtype="int32")
    h = keras.layers.Embedding(VOCAB, WIDTH)(tokens)
    h = keras.layers.Conv1D(128, 5, activation="relu")(h)
    h = keras.layers.GlobalMaxPooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(CLASSES)(h), name="conv1d")


def _length(small):
    return SMOKE_LENGTH if small else LENGTH


def _tokens(rng, n, length):
    return rng.integers(0, VOCAB, size=(n, length)).astype(np.int32)


# -- keras_hub -----------------------------------------------------------------------------
_HUB_SIZES = dict(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
                  max_sequence_length=LENGTH)


def _bert(small):
    import keras_hub
    backbone = keras_hub.models.BertBackbone(**_HUB_SIZES)
    logits = keras.layers.Dense(CLASSES)(backbone.output["pooled_output"])
    return keras.Model(backbone.input, logits, name="bert_classifier")


def gpt2_classifier(sizes, classes=CLASSES):
    """GPT2Backbone(**sizes) with Dense(classes) on the last token, as GPT-2 classifiers read it."""
    import keras_hub
    backbone = keras_hub.models.GPT2Backbone(**sizes)
    logits = keras.layers.Dense(classes)(backbone.output[:, -1, :])
    return keras.Model(backbone.input, logits, name="gpt2_classifier")


def gpt2_causal_lm(sizes):
    """GPT2CausalLM(GPT2Backbone(**sizes), preprocessor=None): tied input/output embeddings."""
    import keras_hub
    backbone = keras_hub.models.GPT2Backbone(**sizes)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None, name="gpt2_causal_lm")


def _gpt2(small):
    return gpt2_classifier(_HUB_SIZES)


def _gpt2_lm(small):
    return gpt2_causal_lm(_HUB_SIZES)


def _gpt2_lm_inputs(rng, n, length):
    x = _bert_inputs(rng, n, length)
    del x["segment_ids"]
    return x


def _next_tokens(rng, x):
    """Causal-LM labels: the inputs shifted left by one, a random token last."""
    ids = x["token_ids"]
    last = rng.integers(0, VOCAB, size=(len(ids), 1)).astype(np.int32)
    return np.concatenate([ids[:, 1:], last], axis=1)


def _bert_inputs(rng, n, length):
    lengths = rng.integers(length // 2, length + 1, size=n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    return {"token_ids": np.where(mask, _tokens(rng, n, length), 0).astype(np.int32),
            "segment_ids": np.zeros((n, length), np.int32),
            "padding_mask": mask.astype(np.int32)}


def _gpt2_inputs(rng, n, length):
    return {"token_ids": _tokens(rng, n, length), "padding_mask": np.ones((n, length), np.int32)}


SPECS = {
    "mobilenet_v2": Spec(_application("MobileNetV2"), 64, _images(-1, 1), "application"),
    "mobilenet_v3_small": Spec(_application("MobileNetV3Small"), 64, _images(0, 255), "application"),
    "efficientnet_b0": Spec(_application("EfficientNetB0"), 32, _images(0, 255), "application"),
    "resnet50": Spec(_application("ResNet50"), 32, _images(-1, 1), "application"),
    "densenet121": Spec(_application("DenseNet121"), 32, _images(-1, 1), "application"),
    "convnext_tiny": Spec(_application("ConvNeXtTiny"), 16, _images(0, 255), "application"),
    "lstm": Spec(_recurrent(keras.layers.LSTM), 128, _tokens, "text"),
    "gru": Spec(_recurrent(keras.layers.GRU), 128, _tokens, "text"),
    "conv1d": Spec(_conv1d, 128, _tokens, "text"),
    "transformer": Spec(lambda small: problems.transformer(VOCAB, _length(small), WIDTH), 128, _tokens, "text"),
    "bert": Spec(_bert, 64, _bert_inputs, "hub"),
    "gpt2": Spec(_gpt2, 64, _gpt2_inputs, "hub"),
    "gpt2_lm": Spec(_gpt2_lm, 64, _gpt2_lm_inputs, "hub", _next_tokens, ("empirical", "sampled")),
}
# The models the smoke pass runs (every other one is skipped there: see bench_models.py).
SMOKED = ("mobilenet_v3_small", "lstm", "gru", "conv1d", "transformer", "bert", "gpt2", "gpt2_lm")


def make(name, *, small=False, seed=0):
    """(model, x, y) for ``name``: ``small`` gives SMOKE_EXAMPLES examples (and the smaller
    MobileNetV3Small).  Applications come with their BatchNorm statistics calibrated."""
    spec = SPECS[name]
    keras.utils.set_random_seed(seed)
    model = spec.build(small)
    rng = np.random.default_rng(seed)
    if spec.family == "application":
        calibrate(model, spec.sample_x(rng, CALIBRATION))
    n = SMOKE_EXAMPLES if small else spec.examples
    x = spec.sample_x(rng, n, _length(small))
    if spec.sample_y is None:
        y = rng.integers(0, CLASSES, size=n).astype(np.int32)
    else:
        y = spec.sample_y(rng, x)
    return model, x, y


def num_params(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))
