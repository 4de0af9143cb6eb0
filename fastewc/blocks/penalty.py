"""The EWC penalty over blocks: Σ over every block of its kind's value, and the analytic
gradient, from ONE compiled function.

    P(θ) = Σ_blocks P_b(θ_b) + λ/2 · c,        ∇_j P = Σ_{blocks b ∋ j} ∇_j P_b

(a variable may be in several blocks: every tracked variable has a diagonal block, and a
Kronecker block adds its own term).  Each block's value and gradient is its kind's
``penalty`` (traced inline); the sum of the shares is one ``reduce_sum`` over them and
λc/2.  As :func:`fastewc.penalty.ewc_penalty_and_gradients`: the value is differentiable
through a ``tf.custom_gradient`` that returns the analytic gradient, ``inline=True`` traces
it into the caller's graph (train steps), and a value that is not finite raises, naming
the blocks whose share is not (:func:`fastewc.penalty.check_finite`).  The function is
traced once per structure of blocks (kinds, shapes) and reused; state values are its
arguments, so a consolidation that only changes values does not retrace.
"""
from typing import NamedTuple

import tensorflow as tf

from fastewc import _policy
from fastewc import penalty as penalty_lib
from fastewc._checks import as_float32
from fastewc.blocks import KINDS


class PlanBlock(NamedTuple):
    """A block resolved against the model: its kind, its model variables, its state
    variables (``fields``) and its name in messages."""
    kind: type
    variables: tuple
    fields: list
    name: str


def _body(structure, thetas, fields, lam, const, damping):
    """(value, grads per theta, shares) for ``structure`` = ((kind name, theta indices), ...)."""
    with tf.name_scope("fastewc/penalty"):
        grads, parts = [None] * len(thetas), []
        for (kind, index), block_fields in zip(structure, fields):
            part, block_grads = KINDS[kind].penalty([thetas[i] for i in index], block_fields, lam, damping)
            parts.append(part)
            for i, g in zip(index, block_grads):
                grads[i] = g if grads[i] is None else grads[i] + g
        value = tf.reduce_sum(tf.stack(parts + [(0.5 * lam) * const]))
        return value, grads, tf.stack(parts)


_COMPILED = {}


def compiled(with_value, jit_compile=None):
    """The shared ``tf.function`` (``with_value``: value, grads and shares; else the
    grads only); ``jit_compile`` None: :func:`fastewc.penalty.default_jit_compile`."""
    jit = _policy.default_jit_compile() if jit_compile is None else bool(jit_compile)
    fn = _COMPILED.get((with_value, jit))
    if fn is None:
        body = _body if with_value else (lambda *args: _body(*args)[1])
        fn = _COMPILED[(with_value, jit)] = tf.function(body, jit_compile=jit, autograph=False)
    return fn


def penalty_and_gradients(blocks, trainable, lam, const, damping, *, inline=False, with_value=True):
    """``(value, grads)`` of the penalty over ``blocks`` (:class:`PlanBlock` list), the
    gradients laid out along ``trainable`` (zeros where no block covers a variable).

    ``lam``, ``const`` (c) and ``damping`` are float32 scalars.  ``with_value=False``
    returns ``(None, grads)`` from the gradient-only function (no finiteness check)."""
    lam, const, damping = as_float32(lam), as_float32(const), as_float32(damping)
    index, thetas, structure, fields = {}, [], [], []
    for block in blocks:
        positions = []
        for v in block.variables:
            if id(v) not in index:
                index[id(v)] = len(thetas)
                thetas.append(penalty_lib.read_float32(v))
            positions.append(index[id(v)])
        structure.append((block.kind.kind, tuple(positions)))
        fields.append([tf.convert_to_tensor(f) for f in block.fields])
    structure = tuple(structure)
    if not blocks:
        value, grads = 0.5 * lam * const, []
    elif inline:
        value, grads, _ = _body(structure, thetas, fields, lam, const, damping)
    elif not with_value:
        value, grads = None, compiled(False)(structure, thetas, fields, lam, const, damping)
    else:
        value, grads = _with_custom_gradient(blocks, structure, thetas, fields, lam, const, damping)
    by_variable = {key: grads[i] for key, i in index.items()}
    return value, [by_variable[id(v)] if id(v) in by_variable else tf.zeros(v.shape, tf.float32) * lam
                   for v in trainable]


def _with_custom_gradient(blocks, structure, thetas, fields, lam, const, damping):
    """The compiled value and grads, the value differentiable w.r.t. the thetas through
    the analytic grads; checked finite."""
    n, sizes = len(thetas), [len(f) for f in fields]
    fn, out = compiled(True), {}

    # Every tensor the forward pass uses is an argument, so tf.custom_gradient sees no
    # captured variable reads; only the θ arguments get a gradient.
    @tf.custom_gradient
    def penalty_with_analytic_gradient(*flat):
        nested, i = [], n
        for size in sizes:
            nested.append(list(flat[i:i + size]))
            i += size
        value, grads, out["parts"] = fn(structure, list(flat[:n]), nested, *flat[-3:])
        out["grads"] = grads

        def grad_fn(upstream):
            return [upstream * g for g in grads] + [None] * (len(flat) - n)

        return value, grad_fn

    value = penalty_with_analytic_gradient(*thetas, *[f for fs in fields for f in fs], lam, const, damping)

    def explain(i):
        kind, positions = structure[i]
        return KINDS[kind].explain([thetas[j] for j in positions], fields[i], lam)

    value = penalty_lib.check_finite(value, out["parts"], [b.name for b in blocks], explain)
    return value, out["grads"]
