"""The stale-trace guard of an EWC penalty.

A trace bakes in the penalty's structure (which blocks, which terms), read when it was
traced; a consolidation that adds to it, or a restore that changes it, bumps a structure
version (a tf.Variable, not checkpointed: it counts this process's changes).  A trace
compares it with the version it was traced at: on a mismatch it raises (a
``tf.debugging.Assert``: an InvalidArgumentError naming the fix) and, where the assertion
does not run (XLA drops it under ``jit_compile=True``), λ is NaN, and so are the value and
the gradients (at no cost: λ scales every term).  A stale trace never returns a silently
partial penalty.  Why not a structure traceable in advance (each block's terms in
variables of unknown leading size): it needs every Kronecker block known before the first
task, and a new head would still change the structure, so this check would be needed
anyway; one mechanism covers every kind and the grown diagonal.  The trainers of
:mod:`fastewc.train` and :mod:`fastewc.keras_fit` retrace on the EWC's ``structure_token``;
traces of ``EWC.penalty`` (not ``inline``: the trainers trace inline) make the change
that staled them warn.
"""
import warnings

import numpy as np
import tensorflow as tf

STALE_TRACE = (
    "fastewc.EWC: this tf.function traced the EWC penalty before a consolidation or a checkpoint "
    "restore changed the penalty's structure (new tracked variables, e.g. a new head, or new "
    "Kronecker terms with curvature='kfac'): the trace cannot see them. Trace it again: create "
    "the tf.function again after consolidating, or train with fastewc.make_train_step / "
    "fastewc.EWCModel, which retrace by themselves.")


class StructureGuard:
    """The structure version of one EWC and the versions its penalty was traced at."""

    def __init__(self):
        with tf.init_scope():
            self.version = tf.Variable(0, dtype=tf.int64, trainable=False, name="structure_version")
        self.count, self.seen, self.traced = 0, None, set()

    def sync(self, structure):
        """Count a change of ``structure`` (hashable); returns whether it changed, and
        warns when a trace of the penalty made before it is now stale."""
        if structure == self.seen:
            return False
        stale = self.count in self.traced
        self.seen, self.count = structure, self.count + 1
        self.version.assign(self.count)
        if stale:
            warnings.warn(STALE_TRACE.replace("this tf.function traced", "a tf.function traced") +
                          " Calling the old trace raises (its penalty is NaN under jit_compile=True).",
                          RuntimeWarning, stacklevel=4)
        return True

    def guarded(self, lam, inline):
        """``lam`` (a float32 tensor), checked against a stale trace when traced (eagerly
        there is nothing to check: the plan is read at each call)."""
        if tf.executing_eagerly():
            return lam
        traced = self.count
        if not inline:
            self.traced.add(traced)
        stale = tf.not_equal(self.version.read_value(), traced)
        check = tf.debugging.Assert(tf.logical_not(stale), [STALE_TRACE])
        with tf.control_dependencies([check]):
            return lam + tf.where(stale, tf.constant(np.nan, tf.float32), tf.constant(0.0))
