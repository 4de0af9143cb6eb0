"""The Kronecker kind: a layer's Fisher block as A ⊗ G (:mod:`fastewc.curvature`).

    F_W̄ ≈ A ⊗ G,    A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,    G = (1/N) Σ_n E_y[Σ_l δ_nl δ_nlᵀ]

A block covers a kernel and its bias (W̄: the kernel reshaped to (d, u), the bias as its
last row) of a layer whose rule has a Kronecker form (``kron`` in
:class:`fastewc.registry.RuleOutput`: Dense and convolution kernels); its per-batch sums
are the rule's :class:`fastewc.registry.KroneckerSums` (a, g) and their means are A and
G, finished into a :class:`fastewc.curvature.KroneckerBlock`.  The plan finds the blocks
and their factor shapes in its eager pass of one example (each ``kron`` called once on
zero deltas).

The factors are dense: A alone is d'² floats (the reference CNN's Dense(9216 → 128):
85M), so the mean is formed once per call rather than per batch (``dense_sums``), and a
call takes rows enough to amortize the fold; XLA's CPU dot for their XᵀX is slower than
oneDNN's (reference MLP, empirical: 20.3 ms with XLA against 14.9 ms without;
``benchmarks/bench_kfac.py``), so a plan with Kronecker blocks is not XLA on CPU by
default.  The sums come only from a rule's layer inputs and deltas, which the
per-example engines do not form.
"""
import numpy as np
import tensorflow as tf

from fastewc import curvature
from fastewc.blocks.base import Block
from fastewc.blocks.diagonal import Diagonal, _path

# Bytes a call holds per accumulated float of a plan with Kronecker blocks: the float64
# total (8), the batch's float32 sum and its flattened copy (4 + 4), the float64 mean and
# its float32 cast at the end (8 + 4).
BYTES_PER_FACTOR_FLOAT = 28


class Kronecker(Block):
    """One layer's Kronecker-factored Fisher block over (kernel, bias) or (kernel,)."""
    kind = "kfac"
    rules_only = ("the Kronecker factors come from the factored rules' layer inputs and deltas, "
                  "which the per-example methods do not form")
    dense_sums = True
    xla_on_cpu = False

    def __init__(self, layer_name, variables, a_shape, g_shape):
        self.layer_name = layer_name
        self.variables = tuple(variables)
        self.sum_shapes = (tuple(a_shape), tuple(g_shape))
        path = _path(self.variables[0])
        self.sum_names = (f"{path} (Kronecker factor A)", f"{path} (Kronecker factor G)")

    # -- estimation ------------------------------------------------------------------------
    @classmethod
    def blocks_of(cls, layer, result):
        if result.kron is None:
            return []
        probe = result.probe
        delta = tf.zeros((1,) + tuple(probe.shape), tf.float32)
        return [cls(layer.name, sums.variables, sums.a.shape, sums.g.shape)
                for sums in result.kron(delta, tf.ones([1, probe.shape[0]]), tf.ones([probe.shape[0]]))]

    @classmethod
    def rule_sums(cls, result, delta, weight, mask):
        return {(cls.kind, id(sums.variables[0])): (sums.a, sums.g) for sums in result.kron(delta, weight, mask)}

    def finish(self, means):
        """The :class:`fastewc.curvature.KroneckerBlock` (factors symmetric up to the
        rounding of their matmuls, XᵀX: symmetrizing the reference CNN's 9217² A would
        cost 0.4 s, and the penalty's gradient 2AΔG is off by that rounding only)."""
        return curvature.KroneckerBlock(self.layer_name, self.variables, means[0], means[1])

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """A :class:`fastewc.KroneckerFisher`: the Kronecker blocks, and the diagonal of
        every variable they do not cover (None where one does)."""
        diagonal = {id(b.variables[0]): p for b, p in zip(blocks, parts) if isinstance(b, Diagonal)}
        return curvature.KroneckerFisher([p for b, p in zip(blocks, parts) if isinstance(b, cls)],
                                         [diagonal.get(id(v)) for v in variables], list(variables))

    @classmethod
    def check_memory(cls, plan, device_bytes):
        """Raise before any pass when the plan's sums alone would take more than half of
        the device's memory (A is d'² floats: a Dense layer with 25 088 inputs, VGG16's
        first, has a 2.5 GB A in float32), naming the layer with the largest factor."""
        need = BYTES_PER_FACTOR_FLOAT * sum(int(np.prod(shape)) for shape in plan.shapes)
        if need <= device_bytes // 2:
            return
        largest = max((b for b in plan.blocks if isinstance(b, cls)), key=lambda b: int(np.prod(b.sum_shapes[0])))
        raise ValueError(
            f"curvature='kfac' needs about {need / 2**30:.1f} GiB for its Kronecker factors, more than "
            f"half of this device's {device_bytes / 2**30:.1f} GiB: layer '{largest.layer_name}' alone has "
            f"an A of shape {largest.sum_shapes[0]} (A is d'² floats for d' inputs). Use "
            "curvature='diagonal' for this model, or reduce the layer's inputs (e.g. pool before it).")
















    # -- state -----------------------------------------------------------------------------
