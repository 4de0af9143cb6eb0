"""The factored engine's rule for a weighted layer that has none: its per-example gradients
vectorized for that layer alone.

For such a layer, o = f(x; θ) its own ``call`` and θ its OWN trainable variables (its
sublayers keep their rules, :func:`fastewc.capture.weighted_layers`), example n's gradient
for cotangent k is

    g_kn = J_θ f(x_n; θ)ᵀ δ_kn,      δ_kn = ∂⟨U_kn, o_n⟩/∂f(x_n)   (the deltas at its output)

:func:`generic_rule` takes part in the capture pass like any rule: it runs the layer's own
``call``, keeps its arguments, and makes the output the probe, so the engine's one backward
pass per cotangent delivers δ there.  Its ``sum_sq`` then runs the layer's ``call`` again
on one (cotangent, example) pair at a time, inside one ``tf.vectorized_map`` over the K·N
pairs: a forward pass of example n through this layer alone and a backward pass of δ_kn to
θ, squared, weighted by w_kn and summed.  The rest of the model is not run again.

Cost: K·N forward and backward passes of the layer (the per-example engine's cost, for this
layer only).  Memory: the vectorized pairs hold their inputs, outputs and gradients, so at
most ``PAIR_FLOATS`` floats of those are formed at once (a loop over chunks of pairs
beyond).  Tensor arguments whose leading dimension is the batch are sliced per example;
other arguments are passed whole.  A layer with several output tensors has no probe here:
it raises :class:`fastewc.registry.UnsupportedLayerError` (``method="auto"`` then uses vmap).
"""
import math

import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc.registry import RuleOutput, UnsupportedLayerError

PAIR_FLOATS = 2**24
METHOD = "tf.vectorized_map over its (cotangent, example) pairs"


def generic_rule(layer, inputs, *args, **kwargs):
    """The :class:`fastewc.registry.RuleOutput` of a rule-less layer (module docstring)."""
    own_call = type(layer).call
    outputs = own_call(layer, inputs, *args, **kwargs)
    if len(tf.nest.flatten(outputs)) != 1 or not tf.nest.flatten(outputs)[0].dtype.is_floating:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has no factored Fisher rule and returns "
            f"{len(tf.nest.flatten(outputs))} tensors; the per-layer path needs one floating "
            "output. Register a rule for it, or use method='vmap'.")
    variables = compat.owned_trainable_variables(layer)
    arguments = (inputs, args, kwargs)
    leaves = tf.nest.flatten(arguments)
    batch = tf.nest.flatten(inputs)[0].shape[0]
    per_example = [isinstance(t, tf.Tensor) and bool(t.shape.rank) and t.shape[0] == batch for t in leaves]

    def pair_squares(delta, weight, n):
        def one(i):
            k_i, n_i = i // n, i % n
            sliced = [t[n_i][None] if cut else t for t, cut in zip(leaves, per_example)]
            x, a, kw = tf.nest.pack_sequence_as(arguments, sliced)
            with tf.GradientTape() as tape:
                out = own_call(layer, x, *a, **kw)
            grads = tape.gradient(out, variables, output_gradients=tf.cast(delta[k_i, n_i][None], out.dtype))
            w = weight[k_i, n_i]
            return [tf.zeros(v.shape, tf.float32) if g is None
                    else w * tf.square(tf.cast(tf.convert_to_tensor(g), tf.float32)) for g, v in zip(grads, variables)]
        return one

    def sum_sq(delta, weight):
        k, n = delta.shape[0], delta.shape[1]
        if k is None or n is None:
            k, n = tf.shape(delta)[0], tf.shape(delta)[1]
        one = pair_squares(delta, weight, n)

        def chunk(start, size):
            squares = tf.vectorized_map(one, start + tf.range(size), fallback_to_while_loop=True)
            return [tf.reduce_sum(s, 0) for s in squares]

        pairs = k * n
        chunk_size = _chunk(pairs, _pair_floats(variables, leaves, per_example, outputs))
        if chunk_size is None or chunk_size == pairs:
            totals = chunk(0, pairs)
        else:
            def body(i, totals):
                return i + 1, [t + c for t, c in zip(totals, chunk(i * chunk_size, chunk_size))]
            zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
            totals = tf.while_loop(lambda i, _: i < pairs // chunk_size, body, (tf.constant(0), zeros))[1]
        return list(zip(variables, totals))

    return RuleOutput(outputs, outputs, sum_sq=sum_sq)


def _pair_floats(variables, leaves, per_example, outputs):
    """Floats one vectorized pair holds: its gradients, its example's inputs and output."""
    def size(shape):
        return math.prod(d if d is not None else 1 for d in shape)
    inputs = sum(size(t.shape[1:]) for t, cut in zip(leaves, per_example) if cut)
    return sum(size(v.shape) for v in variables) + inputs + size(outputs.shape[1:])


def _chunk(pairs, per_pair):
    """Pairs per vectorized chunk: the largest divisor of ``pairs`` whose chunk holds at most
    ``PAIR_FLOATS`` floats (None: ``pairs`` not static, one chunk)."""
    if not isinstance(pairs, int):
        return None
    fits = max(1, PAIR_FLOATS // max(per_pair, 1))
    if pairs <= fits:
        return pairs
    return max(c for c in range(1, fits + 1) if pairs % c == 0)
