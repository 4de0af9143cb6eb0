"""Factored rule for ``keras.layers.EinsumDense`` (and so MultiHeadAttention's projections).

For z = einsum("<in>,<kernel>-><out>", a, W) + b, with the batch axis n the first letter
of both <in> and <out>, example n's kernel gradient is another einsum:

    g_kn(W) = einsum("<in>,k<out>->kn<kernel>", a, δ)        (n kept, not summed)

Letters of <in> or <out> that are neither n nor in <kernel> (a sequence axis, say) are
summed BEFORE squaring.  When there are none (a Dense-like equation such as "ab,bc->ac")
each entry of g_kn is a single product a·δ, so the squares factor and no per-example
tensor is formed:

    Σ_kn w_kn g_kn(W)² = einsum("<in>,k<out>,kn-><kernel>", a², δ², w)

Otherwise the per-example gradients (K·N·|W| floats) are formed, squared and weighted.
The bias (shape from ``bias_axes``, aligned with the trailing output axes) gets
g_kn(b) = δ_kn summed over the output axes it is broadcast along.  A LoRA-enabled layer
(``enable_lora``) has the LoRA factors as its trainable kernel weights instead of W
(:func:`fastewc.rules._common.lora_square_sums`).
"""
import re
import string

import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import check_plain, lora_square_sums, weighted_square_sum


def parse_equation(equation, input_rank):
    """``(in, kernel, out)`` letter strings of an EinsumDense equation, "..." expanded."""
    dotted = equation.replace("...", "0")
    match = re.fullmatch(r"([a-zA-Z0]+),([a-zA-Z]+)->([a-zA-Z0]+)", dotted)
    if not match:
        raise ValueError(f"Cannot parse the EinsumDense equation {equation!r}.")
    in_spec, kernel_spec, out_spec = match.groups()
    if "0" in in_spec:
        used = set(in_spec + kernel_spec + out_spec)
        free = [c for c in string.ascii_letters if c not in used]
        elided = "".join(free[:input_rank - (len(in_spec) - 1)])
        in_spec, out_spec = in_spec.replace("0", elided), out_spec.replace("0", elided)
    return in_spec, kernel_spec, out_spec


def einsum_dense_rule(layer, inputs, *args, **kwargs):
    check_plain(layer, "EinsumDense", lora=True)
    z = keras.ops.einsum(layer.equation, inputs, layer.kernel)
    if layer.bias is not None:
        z = keras.ops.add(z, layer.bias)
    outputs = layer.activation(z) if layer.activation is not None else z
    in_spec, kernel_spec, out_spec = parse_equation(layer.equation, inputs.shape.rank)
    batch = in_spec[0]
    if out_spec[0] != batch or batch in kernel_spec:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' (EinsumDense) with equation {layer.equation!r}: the factored "
            "Fisher rule needs the first input axis to be the batch axis, kept as the first "
            "output axis. Use method='vmap'.")
    a = tf.cast(inputs, tf.float32)
    k_letter = next(c for c in string.ascii_letters if c not in in_spec + kernel_spec + out_spec)
    summed = set(in_spec + out_spec) - set(kernel_spec) - {batch}

    def kernel_pairs(delta, weight):
        if layer.lora_enabled:
            return lora_square_sums(layer, a, delta, weight, in_spec, kernel_spec, out_spec)
        kout = k_letter + out_spec
        if not summed:
            sq_kernel = tf.einsum(f"{in_spec},{kout},{k_letter}{batch}->{kernel_spec}",
                                  tf.square(a), tf.square(delta), weight)
        else:
            g = tf.einsum(f"{in_spec},{kout}->{k_letter}{batch}{kernel_spec}", a, delta)
            sq_kernel = weighted_square_sum(g, weight)
        return [(layer.kernel, sq_kernel)]

    def sum_sq(delta, weight):
        pairs = kernel_pairs(delta, weight)
        if layer.bias is not None:
            pairs.append((layer.bias, weighted_square_sum(_bias_grad(layer, delta), weight)))
        return pairs

    return RuleOutput(outputs, z, sum_sq=sum_sq)


def _bias_grad(layer, delta):
    """Per-example bias gradients (K, N, *bias.shape) from δ (K, N, *output)."""
    bias_shape = list(layer.bias.shape)
    out_rank = delta.shape.rank - 1                       # output rank, batch included
    start = out_rank - len(bias_shape)                    # first output axis the bias covers
    if start < 1:
        raise ValueError(
            f"Layer '{layer.name}' (EinsumDense): a bias over the batch axis has no per-example "
            "gradient the factored rule can compute. Use method='vmap'.")
    lead = list(range(2, start + 1))                      # δ axes before the bias: sum away
    broadcast = [start + 1 + i for i, size in enumerate(bias_shape) if size == 1]
    g = tf.reduce_sum(delta, axis=broadcast, keepdims=True) if broadcast else delta
    if lead:
        g = tf.reduce_sum(g, axis=lead)
    return g


register_rule(keras.layers.EinsumDense, einsum_dense_rule)
