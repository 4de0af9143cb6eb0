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
(:func:`fastewc.rules._common.lora_square_sums`; diagonal only).

Kronecker factors (``kron``, :class:`fastewc.contract.KroneckerSums`) for an equation whose
kernel axes are its input axes (contracted with the input, not in the output) followed by
its output axes (in the output, not in the input), with every other axis of the input a
free axis the output keeps (the batch, positions): MultiHeadAttention's query, key and
value projections "abc,cde->abde" (kernel (d_model, heads, head_dim): input_rank 1) and its
output projection "abcd,cde->abe" (kernel (heads, head_dim, d_model): input_rank 2), a Dense
as "ab,bc->ac".  Then z_nl = W̄ᵀ ā_nl at each position l, with the rows ā_nl the input
features at l flattened in the kernel's input-axis order (+ the 1 of a bias whose shape is
the kernel's output axes, the weight matrix's last row) and the deltas δ_nl the output
features flattened in its output-axis order: the factors are the Dense ones over those
rows, positions treated as examples.  Any other equation (a kernel axis both in the input
and the output, input axes after output axes, an input axis summed without a kernel axis)
has ``kron=None``: the layer keeps its diagonal; so does a bias over only some output axes.
"""
import math
import re
import string

import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, UnsupportedLayerError, register_rule
from fastewc.rules._common import (check_plain, kronecker_sums, lora_square_sums, masked_rows,
                                   weighted_square_sum)


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

    axes = None if layer.lora_enabled else kronecker_axes(in_spec, kernel_spec, out_spec)
    if axes is None:
        return RuleOutput(outputs, z, sum_sq=sum_sq)
    inputs_axes, output_axes, positions = axes
    rank = len(inputs_axes)
    shape = tuple(layer.kernel.shape)
    d, u = math.prod(shape[:rank]), math.prod(shape[rank:])
    bias = layer.bias is not None and tuple(layer.bias.shape) == shape[rank:] \
        and out_spec.endswith(output_axes)
    block = (layer.kernel, layer.bias) if bias else (layer.kernel,)

    def kron(delta, weight, mask):
        rows = tf.einsum(f"{in_spec}->{batch}{positions}{inputs_axes}", masked_rows(a, mask))
        free = rows.shape[1:1 + len(positions)]
        length = free.num_elements() if free.is_fully_defined() else \
            tf.reduce_prod(tf.shape(rows)[1:1 + len(positions)])
        rows = tf.reshape(rows, [-1, length, d])
        deltas = tf.einsum(f"{k_letter}{out_spec}->{k_letter}{batch}{positions}{output_axes}", delta)
        deltas = tf.reshape(deltas, [tf.shape(delta)[0], -1, length, u])
        return [kronecker_sums(block, rows, deltas, weight, mask, bias=bias, input_rank=rank)]

    return RuleOutput(outputs, z, sum_sq=sum_sq, kron=kron)


def kronecker_axes(in_spec, kernel_spec, out_spec):
    """``(input axes, output axes, free axes)`` of an equation with a Kronecker form (the
    module docstring: the kernel's input axes first, then its output axes; the batch and
    the free axes in both input and output), else None.  Letter strings, in kernel order
    (free axes in input order)."""
    inputs = "".join(c for c in kernel_spec if c in in_spec)
    outputs = kernel_spec[len(inputs):]
    positions = "".join(c for c in in_spec[1:] if c not in kernel_spec)
    if (not inputs or not outputs or kernel_spec != inputs + outputs
            or any(c in out_spec for c in inputs) or any(c not in out_spec or c in in_spec for c in outputs)
            or sorted(positions) != sorted(c for c in out_spec[1:] if c not in kernel_spec)):
        return None
    return inputs, outputs, positions


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
