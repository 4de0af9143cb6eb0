"""Factored rule for ``keras.layers.Dense``.

For z_n = a_n W + b the per-example gradients are g_n(W) = a_n ⊗ δ_n and g_n(b) = δ_n with
δ_n = ∂ℓ_n/∂z_n (Kirkpatrick et al. 2017 need only their squares).  With K cotangents
per example weighted by w_kn:

    Σ_kn w_kn g_kn(W)² = (A ⊙ A)ᵀ D,     Σ_kn w_kn g_kn(b)² = Σ_n D_n,
    D_n = Σ_k w_kn δ_kn ⊙ δ_kn

one (d × N)(N × units) matmul: no per-example tensor.  Inputs of rank > 2 (a Dense over a
sequence, (N, T, d)) sum over positions before squaring, g_kn(W) = Σ_t a_nt ⊗ δ_knt, so
that case forms the per-example gradients (K·N·d·units floats) explicitly, unless there are
few positions: then pairs of positions, :func:`fastewc.rules._common.position_pair_square_sum`
(one matmul, no per-example tensor).

Kronecker factors (``kron``, :class:`fastewc.registry.KroneckerSums`): the rows ā = [a, 1]
and the deltas, positions of a sequence treated as examples (the "expand" convention of
Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures", NeurIPS: it needs no per-example sum over positions, and it is
KFC's convention for convolutions, so a Dense over positions and a 1×1 convolution give
the same factors).

A LoRA-enabled layer (``enable_lora``: W frozen, the layer uses W + s·A·B) has the factors
A, B and the bias as its trainable weights: :func:`fastewc.rules._common.lora_square_sums`
(diagonal only; ``curvature="kfac"`` keeps their diagonal).
"""
import keras
import tensorflow as tf

from fastewc.registry import RuleOutput, register_rule
from fastewc.rules._common import (check_plain, kronecker_sums, leading_dims, lora_square_sums, masked_rows,
                                   position_pair_square_sum, use_position_pairs)


def dense_rule(layer, inputs, training=None):
    check_plain(layer, "Dense", lora=True)
    z = tf.matmul(inputs, layer.kernel) if inputs.shape.rank == 2 else tf.tensordot(inputs, layer.kernel, 1)
    if layer.bias is not None:
        z = z + layer.bias
    outputs = layer.activation(z) if layer.activation is not None else z
    a = tf.cast(inputs, tf.float32)

    def lora_sum_sq(delta, weight):
        # As the EinsumDense "nld,du->nlu" over the positions (one for rank-2 inputs).
        a3 = tf.reshape(a, [tf.shape(a)[0], -1, a.shape[-1]])
        d3 = tf.reshape(delta, [tf.shape(delta)[0], tf.shape(delta)[1], -1, delta.shape[-1]])
        pairs = lora_square_sums(layer, a3, d3, weight, "nld", "du", "nlu")
        if layer.bias is not None:
            pairs.append((layer.bias, tf.einsum("kn,knu->u", weight, tf.square(tf.reduce_sum(d3, axis=2)))))
        return pairs

    def sum_sq(delta, weight):
        if a.shape.rank == 2:
            d = tf.einsum("kn,knu->nu", weight, tf.square(delta))
            sq_kernel = tf.matmul(tf.square(a), d, transpose_a=True)
            sq_bias = tf.reduce_sum(d, axis=0)
        else:
            positions = a.shape[1:-1].num_elements()
            # Static shapes where known: a dynamic dimension is ops of its own in the graph.
            a3 = tf.reshape(a, [-1, positions, a.shape[-1]] if positions else
                            [tf.shape(a)[0], -1, a.shape[-1]])
            d3 = tf.reshape(delta, list(leading_dims(delta)) + [positions or -1, delta.shape[-1]])
            if use_position_pairs(positions, delta.shape[0]):
                sq_kernel = position_pair_square_sum(a3, d3, weight)
            else:
                g_kernel = tf.einsum("ntd,kntu->kndu", a3, d3)
                sq_kernel = tf.einsum("kn,kndu->du", weight, tf.square(g_kernel))
            sq_bias = tf.einsum("kn,knu->u", weight, tf.square(tf.reduce_sum(d3, axis=2)))
        pairs = [(layer.kernel, sq_kernel)]
        if layer.bias is not None:
            pairs.append((layer.bias, sq_bias))
        return pairs

    def kron(delta, weight, mask):
        positions = a.shape[1:-1].num_elements() if a.shape.rank > 2 else 1
        positions = tf.reduce_prod(tf.shape(a)[1:-1]) if positions is None else positions
        rows = tf.reshape(masked_rows(a, mask), [-1, positions, a.shape[-1]])
        deltas = tf.reshape(delta, [leading_dims(delta)[0], -1, positions, delta.shape[-1]])
        block = (layer.kernel,) if layer.bias is None else (layer.kernel, layer.bias)
        return [kronecker_sums(block, rows, deltas, weight, mask, bias=layer.bias is not None)]

    if layer.lora_enabled:      # the LoRA factors have no Kronecker form here: their diagonal
        return RuleOutput(outputs, z, sum_sq=lora_sum_sq)
    return RuleOutput(outputs, z, sum_sq=sum_sq, kron=kron)



register_rule(keras.layers.Dense, dense_rule)
