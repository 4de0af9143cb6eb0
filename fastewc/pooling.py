"""A cheaper backward pass for max pooling in the factored Fisher's K-cotangent backward.

The factored path back-propagates K cotangents per example (``exact``: K = C − 1) through
the whole model, so every weightless layer's gradient runs K times.  TensorFlow's
``MaxPoolGrad`` on CPU re-derives each window's maximum from the forward input on every
call; for non-overlapping windows (``pool_size == strides``, ``padding="valid"``) the
routing is a fixed 0/1 mask that can be computed once in the forward pass:

    y[o] = max_{q ∈ window(o)} x[q],     ∂y[o]/∂x[q] = 1 if q = first argmax of window(o)

so each backward pass is one broadcast multiply, dx = upsample(dy) ⊙ mask.  Building the
mask costs about as much as three ``MaxPoolGrad`` calls, so it is used from K = 4 on.
"First" is row-major order inside the window, TensorFlow's own tie rule, so the gradient
is bit-identical to ``MaxPoolGrad`` (ties included: tests/test_pooling.py).  The gain on
the reference CNN is in the README's Fisher tables.

Only used inside :func:`fastewc.capture.capture` (the factored method); the model's
forward op is unchanged.  Layers it does not cover (overlapping windows, ``"same"``
padding, channels_first, MaxPooling3D whose TensorFlow gradient splits ties differently)
keep TensorFlow's gradient.
"""
import itertools

import keras
import tensorflow as tf

# Not MaxPooling3D: TensorFlow's MaxPool3DGrad routes to EVERY tied maximum, not the first.
_MAX_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D)


# Building the mask costs about three MaxPoolGrad calls, so it pays from this many
# backward passes on.
MIN_COTANGENTS = 4


def covers(layer):
    """Whether ``layer`` is a max pooling whose gradient the mask route can take:
    non-overlapping windows, "valid" padding, channels_last, the Keras class's own call."""
    base = next((cls for cls in _MAX_POOLING if isinstance(layer, cls)), None)
    if base is None or type(layer).call is not base.call:     # a subclass's own call: keep it
        return False
    return (tuple(layer.pool_size) == tuple(layer.strides) and layer.padding == "valid"
            and layer.data_format == "channels_last")


def masked_max_pool_call(layer, use_mask):
    """A ``call`` for ``layer`` whose gradient is the mask route when ``use_mask()`` is
    true at gradient time (the mask is then built once, on the first backward pass, and
    reused by the others), TensorFlow's own otherwise; None if the layer is not covered."""
    if not covers(layer):
        return None
    pool = tuple(layer.pool_size)
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
                        again = native(layer, x)
                    return tape.gradient(again, x, output_gradients=dy)
                if not mask:
                    mask.append(_first_max_mask(x, y, pool))
                return _route(dy, mask[0], pool, x)
            y = native(layer, x)
            return y, grad
        return pooled(inputs)

    return call


def _first_max_mask(x, y, pool):
    """(B, o_1, p_1, ..., o_r, p_r, C) 0/1 mask of each window's first maximum, ``y`` the
    pooled output: offsets are visited in row-major order and an offset is hit where its
    strided view equals y and no earlier offset was.  Elementwise on (B, *o, C) views: no
    transpose, argmax or one-hot of the (B, *S, C) input."""
    taken, hits = None, {}
    for offsets in itertools.product(*(range(p) for p in pool)):
        index = (slice(None),) + tuple(slice(o, o + (size // p) * p, p)
                                       for o, size, p in zip(offsets, x.shape[1:-1], pool))
        hit = tf.equal(x[index + (slice(None),)], y)
        hit = hit if taken is None else tf.logical_and(hit, tf.logical_not(taken))
        taken = hit if taken is None else tf.logical_or(taken, hit)
        hits[offsets] = tf.cast(hit, x.dtype)
    for dim in reversed(range(len(pool))):   # stack p_dim right after o_dim: axis dim + 2
        grouped = {}
        for offsets, t in hits.items():
            grouped.setdefault(offsets[:dim], []).append(t)
        hits = {prefix: tf.stack(ts, axis=dim + 2) for prefix, ts in grouped.items()}
    return hits[()]


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
