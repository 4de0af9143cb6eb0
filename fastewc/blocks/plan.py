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
  (:attr:`BlockPlan.amortized_floats`: all of its sums when some are dense, else none);
  per sum, whether its kind's rule scales it (:attr:`BlockPlan.scaled`: a one-batch
  call's sums come as means) and whether it is a Gram matrix, checked finite on its
  diagonal (:attr:`BlockPlan.gram`).

The estimator asks it the XLA default (:attr:`BlockPlan.xla_on_cpu`), checks memory
(:meth:`BlockPlan.check_memory`) and turns the call's means into the public result
(:meth:`BlockPlan.assemble`: a list of tensors, or a :class:`fastewc.KroneckerFisher`).

Two passes (:attr:`BlockPlan.passes` = 2 when a block's kind has ``passes = 2``): after
the first pass the estimator finishes every block's part (:meth:`BlockPlan.finish`), runs
the same data through an engine built with :meth:`BlockPlan.second_plan` (the blocks'
second-pass blocks, :meth:`fastewc.blocks.base.Block.second_pass`), each given its first
part (:meth:`BlockPlan.prepare`), and replaces those parts by the second pass's
(:meth:`BlockPlan.finish_second`) before assembling them (:meth:`BlockPlan.assemble_parts`).
"""
import itertools
import math

from fastewc.blocks.diagonal import Diagonal


class BlockPlan:
    """The blocks of one estimator plan, for the chosen ``kind`` (a
    :class:`fastewc.blocks.base.Block` subclass) over ``variables``."""

    def __init__(self, kind, variables, records=(), *, blocks=None, firsts=()):
        self.kind = kind
        self.variables = list(variables)
        if blocks is None:
            blocks = self._blocks_of(kind, records)
        self.blocks = tuple(blocks)
        self.shapes = [shape for block in blocks for shape in block.sum_shapes]
        self.names = [name for block in blocks for name in block.sum_names]
        # Per sum: whether its kind's rule_sums scales it (Block.scales_sums) and whether
        # it is a Gram matrix, finite where its diagonal is (Block.gram_sums).
        self.scaled = tuple(block.scales_sums for block in blocks for _ in block.sum_shapes)
        self.gram = tuple(bool(flag) for block in blocks
                          for flag, _ in itertools.zip_longest(block.gram_sums, block.sum_shapes))
        self._block_of = {id(v): block for block in blocks for v in block.variables}
        self._kinds_of = {}
        kinds = {type(block) for block in blocks}
        self.xla_on_cpu = all(k.xla_on_cpu for k in kinds)
        dense = any(k.dense_sums for k in kinds)
        self.amortized_floats = sum(math.prod(shape) for shape in self.shapes) if dense else 0
        self._kinds = sorted(kinds, key=lambda k: k.kind)
        self.passes = max(k.passes for k in kinds) if kinds else 1
        self._second = None
        self._firsts = tuple(firsts)     # a second plan: the first plan's index of each block

    def _blocks_of(self, kind, records):
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
        return blocks

    def __repr__(self):
        counts = {}
        for block in self.blocks:
            counts[block.kind] = counts.get(block.kind, 0) + 1
        return f"<fastewc.blocks.BlockPlan {self.kind.kind!r}: {counts}>"

    # -- engines --------------------------------------------------------------------------
    def kinds_of(self, layer):
        """What the factored engine asks for the sums of ``layer``'s blocks (those covering
        its trainable variables), each by its ``rule_sums``, in a fixed order: their kinds,
        and a block whose sums are its own (``own_sums``: a second pass's) itself."""
        kinds = self._kinds_of.get(id(layer))
        if kinds is None:
            found = [self._block_of[id(v)] for v in layer.trainable_variables if id(v) in self._block_of]
            types = {type(b) for b in found if not b.own_sums}
            kinds = self._kinds_of[id(layer)] = ([k for k in self._kinds if k in types]
                                                 + list(dict.fromkeys(b for b in found if b.own_sums)))
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
        return self.assemble_parts(self.finish(means))

    def finish(self, means):
        """Each block's part (aligned with :attr:`blocks`) from the call's means."""
        return [block.finish(m) for block, m in zip(self.blocks, self._split(means))]

    def assemble_parts(self, parts):
        """The chosen kind's public estimate from every block's part."""
        return self.kind.assemble(self.blocks, parts, self.variables)

    def _split(self, means):
        out, i = [], 0
        for block in self.blocks:
            n = len(block.sum_shapes)
            out.append(means[i:i + n])
            i += n
        return out

    # -- a second pass --------------------------------------------------------------------
    def second_plan(self):
        """The plan of the second pass (:attr:`passes` = 2; made once): the second-pass
        block of every block whose kind needs one (:meth:`Block.second_pass`)."""
        if self._second is None:
            firsts = [i for i, block in enumerate(self.blocks) if block.passes > 1]
            self._second = BlockPlan(self.kind, self.variables, firsts=firsts,
                                     blocks=[self.blocks[i].second_pass() for i in firsts])
        return self._second

    def prepare(self, parts):
        """Give each second-pass block its first-pass part (``parts``: the first plan's,
        aligned with its blocks), before the second pass."""
        for block, i in zip(self.blocks, self._firsts):
            block.prepare(parts[i])

    def finish_second(self, means, parts):
        """``parts`` (the first plan's) with each second-pass block's replaced by what it
        finishes from the second pass's ``means`` and its first part."""
        parts = list(parts)
        for block, m, i in zip(self.blocks, self._split(means), self._firsts):
            parts[i] = block.finish(m, parts[i])
        return parts
