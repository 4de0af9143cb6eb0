"""A cheaper backward pass for max pooling in the factored Fisher's K-cotangent backward.

The factored path back-propagates K cotangents per example (``exact``: K = C − 1) through
the whole model, so every weightless layer's gradient runs K times.  TensorFlow's
``MaxPoolGrad`` on CPU re-derives each window's maximum from the forward input on every
call; for non-overlapping windows (``pool_size == strides``, ``padding="valid"``) the
routing is a fixed 0/1 mask that can be computed once in the forward pass:

    y[o] = max_{q ∈ window(o)} x[q],     ∂y[o]/∂x[q] = 1 if q = first argmax of window(o)

so each backward pass is one broadcast multiply, dx = upsample(dy) ⊙ mask.  Building the
mask costs about as much as three ``MaxPoolGrad`` calls, so it is used from K = 4 on.  "First" is
row-major order inside the window, TensorFlow's own tie rule, so the gradient is
bit-identical to ``MaxPoolGrad`` (ties included: tests/test_pooling.py).  On the reference
CNN (exact kind, 9 cotangents) this measured 2.72 s -> 2.33 s.

Only used inside :func:`fastewc.capture.capture` (the factored method); the model's
forward op is unchanged.  Layers it does not cover (overlapping windows, ``"same"``
padding, channels_first, MaxPooling3D whose TensorFlow gradient splits ties differently)
keep TensorFlow's gradient.
"""
import math

import keras
import tensorflow as tf

# Not MaxPooling3D: TensorFlow's MaxPool3DGrad routes to EVERY tied maximum, not the first.
_MAX_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D)


# Building the mask costs about three MaxPoolGrad calls (measured, reference CNN), so it
# pays from this many backward passes on.
MIN_COTANGENTS = 4


def masked_max_pool_call(layer, use_mask):
    """A ``call`` for ``layer`` whose gradient is the mask route when ``use_mask()`` is
    true at gradient time (the mask is then built once, on the first backward pass, and
    reused by the others), TensorFlow's own otherwise; None if the layer is not covered."""
    base = next((cls for cls in _MAX_POOLING if isinstance(layer, cls)), None)
    if base is None or type(layer).call is not base.call:     # a subclass's own call: keep it
        return None
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    if pool != strides or layer.padding != "valid" or layer.data_format != "channels_last":
        return None
    native = type(layer).call

    def call(inputs):
        if any(size is None for size in inputs.shape[1:]):
            return native(layer, inputs)
        @tf.custom_gradient
        def pooled(x):
            mask = []

            def grad(dy):
                if not use_mask():
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        y = native(layer, x)
                    return tape.gradient(y, x, output_gradients=dy)
                if not mask:
                    mask.append(_first_max_mask(x, pool))
                return _route(dy, mask[0], pool, x)
            return native(layer, x), grad
        return pooled(inputs)

    return call


def _cropped(x, pool):
    """``x`` (B, *S, C) without the trailing rows "valid" pooling never reads."""
    sizes = x.shape[1:-1]
    index = (slice(None),) + tuple(slice(0, (s // p) * p) for s, p in zip(sizes, pool)) + (slice(None),)
    return x[index]


def _split_windows(x, pool):
    """(B, *S, C) -> (B, o_1, p_1, ..., o_r, p_r, C) with o_i = S_i // p_i."""
    shape = [-1]
    for size, p in zip(x.shape[1:-1], pool):
        shape += [size // p, p]
    return tf.reshape(x, shape + [x.shape[-1]])


def _first_max_mask(x, pool):
    """(B, o_1, p_1, ..., o_r, p_r, C) one-hot of each window's first maximum."""
    rank = len(pool)
    windows = _split_windows(_cropped(x, pool), pool)
    outer = [0] + [1 + 2 * i for i in range(rank)] + [1 + 2 * rank]      # B, o_i..., C
    inner = [2 + 2 * i for i in range(rank)]                              # p_i...
    flat = tf.transpose(windows, outer + inner)
    lead = tf.shape(flat)[:rank + 2]
    flat = tf.reshape(flat, tf.concat([lead, [math.prod(pool)]], 0))
    hot = tf.one_hot(tf.argmax(flat, axis=-1), math.prod(pool), dtype=x.dtype)
    hot = tf.reshape(hot, tf.concat([lead, pool], 0))                    # B, o..., C, p...
    back = [0] * (2 * rank + 2)
    for position, axis in enumerate(outer + inner):
        back[axis] = position
    return tf.transpose(hot, back)


def _route(dy, mask, pool, x):
    """dx: ``dy`` (B, o_1, ..., o_r, C) placed at each window's first maximum."""
    sizes = x.shape[1:-1]
    expand = [slice(None)]
    for _ in pool:
        expand += [slice(None), None]
    cropped = [-1] + [(s // p) * p for s, p in zip(sizes, pool)] + [x.shape[-1]]
    dx = tf.reshape(dy[tuple(expand + [slice(None)])] * mask, cropped)
    pads = [[0, 0]] + [[0, s - (s // p) * p] for s, p in zip(sizes, pool)] + [[0, 0]]
    if any(after for _, after in pads):
        dx = tf.pad(dx, pads)
    return dx
