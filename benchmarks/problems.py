"""The reference workloads of shared/DESIGN.md §7, shared by every benchmark suite.

* mlp: 784-256-256-10 (ReLU), 512 examples.
* cnn: 28×28×1 → Conv 32 3×3 → Conv 64 3×3 → MaxPool 2 → Dense 128 → Dense 10, 256 examples.
* transformer: Embedding(1000, 64) + MultiHeadAttention(4 heads) + LayerNormalization +
  Dense(128) feed-forward, mean-pooled to 10 logits; 64 tokens, 128 examples.

Synthetic data (timing does not depend on values), softmax over 10 classes, logits out.
``small=True`` gives the same models on a handful of examples for smoke runs.
"""
import keras
import numpy as np
import tensorflow as tf

CLASSES = 10
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp():
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(CLASSES),
    ], name="mlp")


def cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(CLASSES),
    ], name="cnn")


def transformer(vocab=1000, length=64, width=64, heads=4):
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, width)(tokens)
    attended = keras.layers.MultiHeadAttention(heads, width // heads)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(keras.layers.Dense(128, activation="relu")(h)))
    logits = keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, logits, name="transformer")


SPECS = {
    "mlp": (mlp, 512, lambda rng, n: rng.normal(size=(n, 784)).astype(np.float32)),
    "cnn": (cnn, 256, lambda rng, n: rng.normal(size=(n, 28, 28, 1)).astype(np.float32)),
    "transformer": (transformer, 128, lambda rng, n: rng.integers(0, 1000, size=(n, 64)).astype(np.int32)),
}


def make(name, *, small=False, seed=0):
    """(model, x, y) for a reference workload; ``small`` keeps 8 examples."""
    build, n, sample_x = SPECS[name]
    keras.utils.set_random_seed(seed)
    model = build()
    rng = np.random.default_rng(seed)
    n = 8 if small else n
    x = sample_x(rng, n)
    y = rng.integers(0, CLASSES, size=n).astype(np.int32)
    return model, x, y


def floor_function(model, jit, loss=LOSS):
    """The floor: a fresh compiled forward+backward of the mean loss, ``(x, y) ->`` its last
    gradient read back (the whole compiled function runs); the ``tf.function`` itself is
    its ``function`` attribute (to trace it alone)."""
    @tf.function(jit_compile=jit)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=False))
        return tape.gradient(value, model.trainable_variables)

    def call(x, y):
        return forward_backward(x, y)[-1].numpy()
    call.function = forward_backward
    return call
