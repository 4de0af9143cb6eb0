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
general it assumes the input rows independent of the deltas.  Every other variable (norms,
embeddings, depthwise and grouped convolutions) keeps its diagonal.

Positions count as examples (the "expand" convention of Eschenhagen et al. 2023, KFC's for
convolutions): A divides by L, G sums over l, so no per-example sum over positions is
formed.

Both are streamed like the diagonal: each batch's sums (Σ over rows, not yet divided by N)
are folded into one float64 total (:class:`fastewc.engines.base.FisherState`), so a Kronecker
block costs d'² + u² floats of state, and the result is float32.  Cost per batch on top of
the factored engine's forward and K backward passes: N·L·d'² multiply-adds for A and
K·N·L·u² for G per block.  A is what dominates where d' is large (a Dense after Flatten:
the reference CNN's 9217² A costs more than the whole forward+backward; README), and
:func:`check_factor_memory` refuses factors that would not fit the device.

A :class:`Layout` says which quantities an estimator's plan accumulates, in order, and
turns the accumulated means back into what the user gets (:func:`assemble`).
"""
import typing

import numpy as np
import tensorflow as tf

from fastewc import capture as capture_lib
from fastewc import kronecker

CURVATURES = ("diagonal", "kfac")


class KroneckerBlock(typing.NamedTuple):
    """One layer's Kronecker-factored Fisher block, A ⊗ G (float32, symmetric PSD)."""
    layer: str              # the layer's name
    variables: tuple        # (kernel, bias) or (kernel,): the model variables it covers
    a: tf.Tensor            # (d', d'), d' = kernel rows (+1 with a bias)
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
            diag = tf.tensordot(tf.linalg.diag_part(block.a), tf.linalg.diag_part(block.g), 0)
            kernel = block.variables[0]
            rows = kronecker.matrix_shape(kernel.shape, block.input_rank)[0]
            out[id(kernel)] = tf.reshape(diag[:rows], kernel.shape)
            if len(block.variables) > 1:
                out[id(block.variables[1])] = tf.reshape(diag[rows], block.variables[1].shape)
        return [out[id(v)] for v in self.variables]


class Layout(typing.NamedTuple):
    """The quantities a plan accumulates: ``keys`` (the engine's names for them: id(variable)
    for a diagonal, ("a" | "g", id(kernel)) for a factor), their ``shapes`` and ``names``
    (for messages), and ``blocks`` = (layer name, variables, index of a, index of g, input
    rank: :class:`KroneckerBlock`'s)."""
    curvature: str
    keys: list
    shapes: list
    names: list
    blocks: list

    @property
    def kronecker(self):
        return self.curvature == "kfac"


def _path(variable):
    return getattr(variable, "path", None) or variable.name


def diagonal_layout(variables):
    """One quantity per variable, its own shape."""
    return Layout("diagonal", [id(v) for v in variables], [tuple(v.shape) for v in variables],
                  [_path(v) for v in variables], [])


def kronecker_layout(model, x, rules, variables):
    """``(layout, probe floats per example)`` from ONE eager forward pass of ``x`` (one
    example) under :func:`fastewc.capture.capture`: which layers' rules give Kronecker
    blocks, and their factor shapes (each ``kron`` is called once on zero deltas).  Raises
    :class:`fastewc.registry.UnsupportedLayerError` as :func:`fastewc.capture.survey` does."""
    records, probe_floats = capture_lib.recorded(model, x, rules)
    factors = {}
    for layer, result in records:
        if result.kron is None:
            continue
        probe = result.probe
        delta = tf.zeros((1,) + tuple(probe.shape), tf.float32)
        for sums in result.kron(delta, tf.ones([1, probe.shape[0]]), tf.ones([probe.shape[0]])):
            factors[id(sums.variables[0])] = (layer.name, tuple(sums.variables),
                                              tuple(sums.a.shape), tuple(sums.g.shape), sums.input_rank)
    covered = {id(v) for _, block, _, _, _ in factors.values() for v in block}
    keys, shapes, names, blocks = [], [], [], []
    for v in variables:
        if id(v) in factors:
            name, block, a_shape, g_shape, input_rank = factors[id(v)]
            blocks.append((name, block, len(keys), len(keys) + 1, input_rank))
            keys += [("a", id(v)), ("g", id(v))]
            shapes += [a_shape, g_shape]
            names += [f"{_path(v)} (Kronecker factor A)", f"{_path(v)} (Kronecker factor G)"]
        elif id(v) not in covered:
            keys.append(id(v))
            shapes.append(tuple(v.shape))
            names.append(_path(v))
    return Layout("kfac", keys, shapes, names, blocks), probe_floats


# Bytes a call holds per accumulated float of a Kronecker layout: the float64 total (8), the
# batch's float32 sum and its flattened copy (4 + 4), the float64 mean and its float32 cast
# at the end (8 + 4).
BYTES_PER_FACTOR_FLOAT = 28


def check_factor_memory(layout, device_bytes):
    """Raise before any pass when the factors alone would take more than half of the
    device's memory (A is d'² floats: a Dense layer with 25 088 inputs, VGG16's first, has
    a 2.5 GB A in float32), naming the layer with the largest factor."""
    need = BYTES_PER_FACTOR_FLOAT * sum(int(np.prod(shape)) for shape in layout.shapes)
    if not layout.blocks or need <= device_bytes // 2:
        return
    name, _, a, _, _ = max(layout.blocks, key=lambda block: int(np.prod(layout.shapes[block[2]])))
    raise ValueError(
        f"curvature='kfac' needs about {need / 2**30:.1f} GiB for its Kronecker factors, more than "
        f"half of this device's {device_bytes / 2**30:.1f} GiB: layer '{name}' alone has an A of "
        f"shape {layout.shapes[a]} (A is d'² floats for d' inputs). Use curvature='diagonal' for "
        "this model, or reduce the layer's inputs (e.g. pool before it).")


def assemble(layout, values, variables):
    """The estimator's result from the accumulated means ``values`` (aligned with
    ``layout.keys``): the list itself for the diagonal, else a :class:`KroneckerFisher`
    (factors symmetric up to the rounding of their matmuls, XᵀX: symmetrizing the reference
    CNN's 9217² A would cost 0.4 s, and the penalty's gradient 2AΔG is off by that rounding
    only)."""
    if not layout.kronecker:
        return values
    index = {key: i for i, key in enumerate(layout.keys)}
    blocks = [KroneckerBlock(name, block, values[a], values[g], input_rank)
              for name, block, a, g, input_rank in layout.blocks]
    diagonal = [values[index[id(v)]] if id(v) in index else None for v in variables]
    return KroneckerFisher(blocks, diagonal, list(variables))
