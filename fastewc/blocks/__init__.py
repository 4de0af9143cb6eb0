"""Curvature blocks: the unit of estimation, state, penalty and file (issue 25).

A *block* covers some of a model's trainable variables with one *kind* of curvature.  A
kind knows, for its block:

* estimation -- which per-batch sums it needs from a rule's output (or from per-example
  gradients), and how to finish their means into its estimate;
* state -- how an estimate merges into its EWC state (separate / online, γ, damping),
  its penalty value and analytic gradient, and how it is written to and read from a
  file and a checkpoint.

``KINDS`` maps a curvature name to its kind; the plan (which block for which layer, from
the rules and the user's choice) is made once and is the only place that chooses
(:class:`fastewc.blocks.plan.BlockPlan`).
"""
from fastewc.blocks.diagonal import Diagonal
from fastewc.blocks.kronecker import Kronecker
from fastewc.blocks.plan import BlockPlan

KINDS = {kind.kind: kind for kind in (Diagonal, Kronecker)}

__all__ = ["KINDS", "BlockPlan", "Diagonal", "Kronecker"]
