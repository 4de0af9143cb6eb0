"""What a Fisher estimator accumulates: the diagonal, or Kronecker factors per layer.

``curvature="diagonal"`` (the default) keeps one F_i per parameter (:mod:`fastewc.fisher`).
``curvature="kfac"`` keeps, for each layer whose rule has a Kronecker form (Dense,
convolution and EinsumDense kernels with their bias: ``kron`` in
:class:`fastewc.contract.RuleOutput`),
the two factors of its Fisher block (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions; Ritter, Botev & Barber 2018 for their use in continual learning):

    F_W̄ ≈ A ⊗ G,    A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,    G = (1/N) Σ_n E_y[Σ_l δ_nl δ_nlᵀ]

for the block's weight matrix W̄ (the kernel reshaped to (d, u), its input axes as rows
and its output axes as columns, the bias as its last row;
:func:`fastewc.kronecker.weight_matrix`), its input rows ā = [a, 1] at the L
positions l of example n and the output deltas δ = ∂ℓ/∂z, with y as the kind says
(true label, sampled, or the full expectation through the K weighted cotangents).  For
one example at one position A ⊗ G IS the Fisher block E_y[vec(ā δᵀ) vec(ā δᵀ)ᵀ]; in
general it assumes the input rows independent of the deltas.  An Embedding's table (V × D) is a block
too, a Dense layer on one-hot rows: its A is diagonal, the mean token counts per position,
and is kept as that vector of V floats (:mod:`fastewc.rules.embedding`).  Every other
variable (norms, position embeddings, a tied embedding table read both ways, depthwise and
grouped convolutions) keeps its diagonal.

Positions count as examples (the "expand" convention of Eschenhagen et al. 2023, KFC's for
convolutions): A divides by L, G sums over l, so no per-example sum over positions is
formed.

Both are streamed like the diagonal: each batch's sums (Σ over rows, not yet divided by N)
are divided by N in float32 when the call has one batch, else folded into float64 totals
(:class:`fastewc.engines.base.FisherState`), so a Kronecker block costs d'² + u² floats of
state, and the result is float32.  Cost per batch on top of
the factored engine's forward and K backward passes: N·L·d'² multiply-adds for A and
K·N·L·u² for G per block.  A is what dominates where d' is large (a Dense after Flatten:
the reference CNN's 9217² A costs more than the whole forward+backward; README), and
:meth:`fastewc.blocks.Kronecker.check_memory` refuses factors that would not fit the device.

Which block covers which variables, what each accumulates and how its means become
these results is the block plan's (:mod:`fastewc.blocks`: the kinds
:class:`fastewc.blocks.Diagonal` and :class:`fastewc.blocks.Kronecker`); this module
holds the public result types.
"""
import typing

import numpy as np
import tensorflow as tf

from fastewc import kronecker


def __getattr__(name):
    """``CURVATURES``: the curvature names, the keys of :data:`fastewc.blocks.KINDS` (read
    when asked: the block kinds import this module's result types)."""
    if name == "CURVATURES":
        from fastewc.blocks import KINDS
        return tuple(KINDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class KroneckerBlock(typing.NamedTuple):
    """One layer's Kronecker-factored Fisher block, A ⊗ G (float32, symmetric PSD)."""
    layer: str              # the layer's name
    variables: tuple        # (kernel, bias) or (kernel,): the model variables it covers
    a: tf.Tensor            # (d', d'), d' = kernel rows (+1 with a bias); or its diagonal
    #                         (d',) when A is diagonal (an Embedding's: the token counts)
    g: tf.Tensor            # (u, u), u = kernel columns
    # The kernel's leading axes that are inputs (rows); None: all but the last
    # (:func:`fastewc.kronecker.matrix_shape`; an EinsumDense kernel may have several outputs).
    input_rank: typing.Optional[int] = None


class KroneckerFisher(typing.NamedTuple):
    """The result of a ``curvature="kfac"`` Fisher: the Kronecker blocks, and the diagonal
    of every trainable variable no block covers (``diagonal`` is aligned with
    ``variables``, the model's trainable variables, with None where a block covers one)."""
    blocks: list
    diagonal: list
    variables: list

    def full_diagonal(self):
        """The diagonal of the whole approximation, one float32 tensor per variable: for a
        block, diag(A ⊗ G) = diag(A) ⊗ diag(G) split into its kernel and bias."""
        out = {id(v): f for v, f in zip(self.variables, self.diagonal) if f is not None}
        for block in self.blocks:
            diag = tf.tensordot(kronecker.diagonal_of(block.a), tf.linalg.diag_part(block.g), 0)
            kernel = block.variables[0]
            rows = kronecker.matrix_shape(kernel.shape, block.input_rank)[0]
            out[id(kernel)] = tf.reshape(diag[:rows], kernel.shape)
            if len(block.variables) > 1:
                out[id(block.variables[1])] = tf.reshape(diag[rows], block.variables[1].shape)
        return [out[id(v)] for v in self.variables]
