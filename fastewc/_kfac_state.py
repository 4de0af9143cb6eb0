"""The Kronecker part of a ``curvature="kfac"`` EWC's state: each block's terms as
tf.Variables, their merge with a task (pure, then committed or undone) and their
checkpoint keys.  The maths is :mod:`fastewc.kfac_penalty`'s.

A block is keyed by its variables' EWC keys, ``(kernel key, bias key or None)``.  Its
t-th term lives in four non-trainable float32 variables, checkpointed under
``"<kernel key>|<bias key>|<t>|<field>"`` (field: coef, a, g, anchor); a checkpoint
restore stages them (:mod:`fastewc._state_table`) and the EWC replaces the blocks with the
checkpoint's (:meth:`KroneckerState.replace`, shapes checked with :func:`block_shapes`).
"""
import numpy as np
import tensorflow as tf

from fastewc import kfac_penalty, kronecker
from fastewc._state_table import StateTable

FIELDS = ("coef", "a", "g", "anchor")


def block_shapes(kernel_shape, has_bias, input_rank=None):
    """Shapes of (coef, A, G, W̄*) for a kernel of ``kernel_shape`` split after its first
    ``input_rank`` axes (:func:`fastewc.kronecker.matrix_shape`)."""
    rows, units = kronecker.matrix_shape(kernel_shape, input_rank)
    rows += 1 if has_bias else 0
    return (), (rows, rows), (units, units), (rows, units)


def term_key(block, t, field):
    kernel, bias = block
    return f"{kernel}|{bias or ''}|{t}|{field}"


def parse_term_key(key):
    """``(block, t, field)`` of a checkpoint key, or None if it is not one."""
    parts = key.split("|")
    if len(parts) != 4 or parts[3] not in FIELDS or not parts[2].isdigit():
        return None
    return (parts[0], parts[1] or None), int(parts[2]), parts[3]


class KroneckerState(tf.Module):
    """``{block: [Term of tf.Variables]}`` with a checkpoint view by key (``entry_of(key)``:
    the staging entry of a term field's key, :class:`fastewc._state_table.StateTable`)."""

    _TF_MODULE_IGNORED_PROPERTIES = frozenset(tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_blocks"})

    def __init__(self, entry_of):
        super().__init__(name="kronecker")
        object.__setattr__(self, "_blocks", {})
        self._terms = StateTable("terms", entry_of)

    # -- reading ------------------------------------------------------------------------
    @property
    def blocks(self):
        """``{block: [Term]}`` (the live variables; do not assign them)."""
        return self._blocks

    @property
    def num_terms(self):
        return sum(len(terms) for terms in self._blocks.values())

    @property
    def state_bytes(self):
        return sum(4 * int(np.prod(v.shape)) for terms in self._blocks.values() for term in terms
                   for v in term.values())

    def snapshot(self):
        """``{block: [(c, A, G, W̄*)]}`` as float32 NumPy arrays."""
        return {block: [tuple(np.asarray(v.numpy(), np.float32) for v in term.values()) for term in terms]
                for block, terms in self._blocks.items()}

    # -- writing ------------------------------------------------------------------------
    def commit(self, pending):
        """Assign ``pending`` = ``{block: [Term of tensors]}`` (a block's list never
        shrinks), creating the variables of new terms; returns ``undo()``, which puts the
        previous values back and drops the created variables."""
        saved, created = [], []
        try:
            for block, new_terms in pending.items():
                terms = self._blocks.setdefault(block, [])
                for t, new in enumerate(new_terms):
                    if t < len(terms):
                        saved.append((terms[t], tuple(v.read_value() for v in terms[t].values())))
                        for variable, value in zip(terms[t].values(), new.values()):
                            variable.assign(value)
                    else:
                        terms.append(self._create(block, t, [tf.convert_to_tensor(v) for v in new.values()]))
                        created.append((block, t))
        except BaseException:
            self._undo(saved, created)
            raise
        return lambda: self._undo(saved, created)

    def _undo(self, saved, created):
        for term, values in saved:
            for variable, value in zip(term.values(), values):
                variable.assign(value)
        for block, t in reversed(created):
            terms = self._blocks[block]
            if len(terms) == t + 1:
                terms.pop()
            for field in FIELDS:
                key = term_key(block, t, field)
                if key in self._terms:
                    del self._terms[key]
            if not terms:
                del self._blocks[block]

    def _create(self, block, t, values):
        variables = []
        with tf.init_scope():
            for field, value in zip(FIELDS, values):
                variable = tf.Variable(value, dtype=tf.float32, trainable=False, name=f"kfac_{field}")
                self._terms[term_key(block, t, field)] = variable
                variables.append(variable)
        return kfac_penalty.Term(*variables)

    def replace(self, blocks):
        """Make the state exactly ``blocks`` = ``{block: [Term of tensors]}`` (shapes
        already checked): existing term variables are assigned, missing ones created,
        the others (terms and blocks ``blocks`` lacks) dropped."""
        for block in [b for b in self._blocks if b not in blocks]:
            self._drop(block, 0)
        for block, new_terms in blocks.items():
            self._drop(block, len(new_terms))
        self.commit(blocks)

    def _drop(self, block, keep):
        """Drop the terms of ``block`` from the ``keep``-th on (the block if none is left)."""
        terms = self._blocks.get(block, [])
        for t in range(keep, len(terms)):
            for field in FIELDS:
                del self._terms[term_key(block, t, field)]
        del terms[keep:]
        if not terms:
            self._blocks.pop(block, None)
