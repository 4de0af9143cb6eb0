"""The block plan: which block covers which variables, made once per estimator plan.

    plan = BlockPlan(KINDS[curvature], model.trainable_variables, records)

``records`` are the (layer, :class:`fastewc.registry.RuleOutput`) pairs of one eager
forward pass of one example under the rules (:func:`fastewc.capture.survey`; none for
the per-example engines).  Each layer's rule output offers the chosen kind its blocks
(:meth:`fastewc.blocks.base.Block.blocks_of`: a Kronecker block per Dense or convolution
kernel with its bias); every variable no such block covers gets a
:class:`fastewc.blocks.diagonal.Diagonal` block.  Blocks are in the order of their first
variable among the model's.

An engine is built with the plan and asks it, never the kind:

* the factored engine, per layer, which kinds' sums to ask of the rule
  (:meth:`BlockPlan.kinds_of`), then the batch's sums in block order
  (:meth:`BlockPlan.collect`);
* the per-example engines, the blocks' sums from the squared gradients
  (:meth:`BlockPlan.from_gradients`);
* every engine, the shapes it accumulates (:attr:`BlockPlan.shapes`) and which floats a
  call of several batches folds per batch that its rows should amortize
  (:attr:`BlockPlan.amortized_floats`: all of its sums when some are dense, else none).

The estimator asks it the XLA default (:attr:`BlockPlan.xla_on_cpu`), checks memory
(:meth:`BlockPlan.check_memory`) and turns the call's means into the public result
(:meth:`BlockPlan.assemble`: a list of tensors, or a :class:`fastewc.KroneckerFisher`).
"""
import math

from fastewc.blocks.diagonal import Diagonal


class BlockPlan:
    """The blocks of one estimator plan, for the chosen ``kind`` (a
    :class:`fastewc.blocks.base.Block` subclass) over ``variables``."""

    def __init__(self, kind, variables, records=()):
        self.kind = kind
        self.variables = list(variables)
        offered = {}
        for layer, result in records:
            for block in kind.blocks_of(layer, result):
                offered[id(block.variables[0])] = block
        covered = {id(v) for block in offered.values() for v in block.variables}
        blocks = []
        for v in self.variables:
            if id(v) in offered:
                blocks.append(offered[id(v)])
            elif id(v) not in covered:
                blocks.append(Diagonal(v))
        self.blocks = tuple(blocks)
        self.shapes = [shape for block in blocks for shape in block.sum_shapes]
        self.names = [name for block in blocks for name in block.sum_names]
        self._block_of = {id(v): block for block in blocks for v in block.variables}
        self._kinds_of = {}
        kinds = {type(block) for block in blocks}
        self.xla_on_cpu = all(k.xla_on_cpu for k in kinds)
        dense = any(k.dense_sums for k in kinds)
        self.amortized_floats = sum(math.prod(shape) for shape in self.shapes) if dense else 0
        self._kinds = sorted(kinds, key=lambda k: k.kind)

    def __repr__(self):
        counts = {}
        for block in self.blocks:
            counts[block.kind] = counts.get(block.kind, 0) + 1
        return f"<fastewc.blocks.BlockPlan {self.kind.kind!r}: {counts}>"

    # -- engines --------------------------------------------------------------------------
    def kinds_of(self, layer):
        """The kinds whose sums the factored engine asks of ``layer``'s rule (those of the
        blocks covering its trainable variables), in a fixed order."""
        kinds = self._kinds_of.get(id(layer))
        if kinds is None:
            found = {type(self._block_of[id(v)]) for v in layer.trainable_variables if id(v) in self._block_of}
            kinds = self._kinds_of[id(layer)] = [k for k in self._kinds if k in found]
        return kinds

    def collect(self, sums):
        """``sums`` ({block key: tuple of sums}, from the rules) in block order."""
        missing = [name for block in self.blocks if block.key not in sums for name in block.sum_names]
        if missing:
            raise ValueError(f"The factored rules returned no value for {missing}.")
        return tuple(sums[block.key] for block in self.blocks)

    def from_gradients(self, squares):
        """The blocks' sums, in block order, from ``squares`` (one Σ_n Σ_k W_kn g_kn² per
        variable, aligned with :attr:`variables`)."""
        by_id = {id(v): s for v, s in zip(self.variables, squares)}
        return tuple(block.gradient_sums(by_id) for block in self.blocks)

    # -- estimator ------------------------------------------------------------------------
    def check_memory(self, device_bytes):
        """Raise, before any pass, when a kind's blocks would not fit the device."""
        for kind in self._kinds:
            kind.check_memory(self, device_bytes)

    def assemble(self, means):
        """The estimate from the call's means (aligned with :attr:`shapes`): each block
        finishes its own, and the chosen kind assembles them into its public type."""
        parts, i = [], 0
        for block in self.blocks:
            n = len(block.sum_shapes)
            parts.append(block.finish(means[i:i + n]))
            i += n
        return self.kind.assemble(self.blocks, parts, self.variables)
