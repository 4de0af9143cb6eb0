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

On the EWC side every tracked variable has a diagonal block (the base kind, ``BASE``); a
curvature's kind adds its blocks on top (:func:`kinds_of`).  The state of all of them is
one store (:class:`fastewc.blocks.store.State`), their penalty one compiled function
(:mod:`fastewc.blocks.penalty`).
"""
import numbers

from fastewc import kronecker as _kronecker_maths
from fastewc._checks import as_float32, check_one_of
from fastewc.blocks.task import Settings, Task
from fastewc.blocks.diagonal import Diagonal, check_aligned
from fastewc.blocks.kronecker import Kronecker
from fastewc.blocks.ekfac import EKFAC
from fastewc.blocks.plan import BlockPlan
from fastewc.kfac_penalty import KFAC_SUMS
from fastewc.penalty import read_float32

KINDS = {kind.kind: kind for kind in (Diagonal, Kronecker, EKFAC)}
BASE = Diagonal

__all__ = ["KINDS", "BASE", "BlockPlan", "Diagonal", "Kronecker", "EKFAC", "Settings", "Task", "kinds_of", "check_options", "task"]


def kinds_of(curvature):
    """The kinds an EWC of ``curvature`` merges each task into: the base (every tracked
    variable) and the curvature's own, in that order."""
    return tuple(dict.fromkeys((BASE, KINDS[curvature])))


def option_takers(option, kinds):
    """``'kfac' or 'ekfac'``: the names in ``kinds`` ({name: kind}) whose kind reads ``option``."""
    return " or ".join(repr(name) for name, kind in kinds.items() if option in kind.OPTIONS)


def check_options(curvature, damping, kfac_sum, mode):
    """Check ``curvature`` and the options of its kinds (``damping``, ``kfac_sum``)
    together; returns damping as a float.  An option no kind of ``curvature`` reads must
    keep its default."""
    check_one_of("curvature", curvature, tuple(KINDS))
    check_one_of("kfac_sum", kfac_sum, KFAC_SUMS)
    if not isinstance(damping, numbers.Real):
        raise ValueError(f"`damping` must be a finite number >= 0. Received: damping={damping!r}")
    damping = _kronecker_maths.check_damping(damping)
    kinds = kinds_of(curvature)
    if not any(kind.OPTIONS for kind in kinds):
        for name, value, default in (("damping", damping, 0), ("kfac_sum", kfac_sum, "exact")):
            if value != default:
                raise ValueError(f"`{name}` applies to curvature={option_takers(name, KINDS)} only. "
                                 f"Received: {name}={value!r} with curvature={curvature!r}")
    for kind in kinds:
        if hasattr(kind, "check_options"):
            kind.check_options(mode, kfac_sum)
    return float(damping)


def task(curvature, result, anchors, source, tracking):
    """A validated :class:`Task` of ``source`` (the EWC's model or a sub-model of it):
    ``result`` (the Fisher estimator's result for ``curvature``) split into each kind's
    estimates, and the anchors θ_t (``anchors`` aligned with ``source.trainable_variables``,
    None: its current weights) per EWC key.  Raises before anything is merged."""
    KINDS[curvature].check_result(result, source, tracking)
    estimates = {kind.kind: kind.estimate(result, source, tracking) for kind in kinds_of(curvature)}
    trainable = list(source.trainable_variables)
    if anchors is None:
        theta = {tracking.key(v): read_float32(v) for v in trainable}
    else:
        values = check_aligned("anchors", anchors, source)
        theta = {tracking.key(v): as_float32(a) for v, a in zip(trainable, values)}
    return Task(estimates, theta, tracking.by_key(), anchors is not None)
