"""The contract between a penalty (:class:`fastewc.EWC`) and the trainers, and the one
place the penalty's gradient is added to a train step's gradients.

Both trainers (:mod:`fastewc.train`, :mod:`fastewc.keras_fit`) minimise
L_data + Σ model.losses + P(θ) and take the data gradient from a tape over a loss that
Keras may have scaled: by the loss scale s of a ``LossScaleOptimizer`` (which divides the
summed gradient by s before the update) and by 1/R under a ``tf.distribute`` strategy with
R replicas (whose gradients the optimizer sums).  The penalty's gradient λ·A·(θ − μ) comes
from the penalty itself, analytically, and enters the sum as

    g_j + (s / R) · ∇P_j        for every trained variable j (by identity),

so the update equals that of the unscaled, single-device objective.  s is a power of two,
so the scaling is exact.  Layering: this module imports neither EWC nor the trainers;
they import it.
"""
import contextlib
from typing import Protocol, Sequence, runtime_checkable

import tensorflow as tf

from fastewc import _keras_compat as compat


@runtime_checkable
class PenaltySource(Protocol):
    """What a trainer needs from an EWC (:class:`fastewc.EWC` is the implementation).

    * ``model``: the Keras model whose weights are penalized.
    * ``penalty_and_gradients(*, inline)``: ``(P, grads)``, P a float scalar and ``grads``
      one gradient per ``model.trainable_variables`` (None or zeros where P does not
      depend on it).  ``inline=True`` asks for the computation traced into the caller's
      graph, without a nested function or a custom gradient.
    * ``penalty_is_active()``: a bool tensor, False when P and its gradient are exactly 0
      (the trainers then skip them with a ``tf.cond``).
    * ``tracked_paths``: the penalized variables' keys.  The list only grows; when it does,
      a compiled step traced before must be traced again (:func:`tracking_token`).
    * ``state_guard`` (optional): a :class:`fastewc._rwlock.ReadersWriterLock` whose
      exclusive holder writes the state; a trainer holds it shared around each compiled
      call (:func:`reading_state`), so a step reads one whole state, never half a commit.
    """

    @property
    def model(self): ...

    @property
    def tracked_paths(self) -> Sequence[str]: ...

    def penalty_and_gradients(self, *, inline: bool = False): ...

    def penalty_is_active(self) -> tf.Tensor: ...


def check_penalty_source(ewc, model, *, optional):
    """``ewc`` satisfies :class:`PenaltySource` (or is None when ``optional``) and was built
    on ``model`` or on a model with the same trainable variables (in any order: the penalty's
    gradients are matched to the trained variables by identity); returns it."""
    if ewc is None and optional:
        return None
    if not isinstance(ewc, PenaltySource):
        expected = "None or a fastewc.EWC" if optional else "a fastewc.EWC"
        raise TypeError(f"`ewc` must be {expected}. Received: ewc of type {type(ewc).__name__}")
    ewc_model = ewc.model
    if ewc_model is not model:
        ours = {id(v): v for v in ewc_model.trainable_variables}
        theirs = {id(v): v for v in model.trainable_variables}
        same_variables = bool(ewc_model.variables) and (
            {id(v) for v in ewc_model.variables} == {id(v) for v in model.variables})
        if ours.keys() != theirs.keys() or not (ours or same_variables):
            if same_variables:
                only_theirs = variable_paths(v for k, v in theirs.items() if k not in ours)
                only_ours = variable_paths(v for k, v in ours.items() if k not in theirs)
                raise ValueError(
                    f"`ewc` was built on model '{ewc_model.name}', which has the same variables "
                    f"as `model` '{model.name}' but other trainable ones (trainable in "
                    f"'{model.name}' only: {only_theirs}; in '{ewc_model.name}' only: "
                    f"{only_ours}): a `trainable` flag was set on one of them (e.g. "
                    "`outer.trainable = False`). "
                    "Build the EWC on `model` itself. Received: an EWC for a model with other "
                    "trainable variables")
            raise ValueError(
                f"`ewc` was built on model '{ewc_model.name}', not on `model` '{model.name}'. "
                "Received: an EWC for another model")
    return ewc


def variable_paths(variables):
    """The paths of ``variables`` (for messages)."""
    return [getattr(v, "path", None) or v.name for v in variables]


def reading_state(ewc):
    """The context a trainer holds around each compiled call that reads ``ewc``'s state: its
    ``state_guard`` shared (a commit in another thread waits for the call, and a call waits
    for a commit under way); nothing without an EWC or a guard."""
    guard = getattr(ewc, "state_guard", None)
    return contextlib.nullcontext() if guard is None else guard.shared()


def tracking_token(ewc):
    """A value that changes when ``ewc`` starts penalizing more variables, or when its
    penalty otherwise changes structure (``structure_token``, if it has one: an EWC with
    Kronecker terms gets a term per task); None without an EWC.  A trainer retraces its
    compiled step when it changes."""
    if ewc is None:
        return None
    return getattr(ewc, "structure_token", None) or len(ewc.tracked_paths)


def uses_float16(model):
    """Whether any layer of ``model`` computes in float16 (it then needs loss scaling)."""
    return any(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) == "float16"
               for layer in compat.all_layers(model))


def add_penalty(ewc, grads, variables, *, optimizer, replica_scale):
    """``(P, [g_j + (s·r)·∇P_j])``: the penalty and ``grads`` (of ``variables``) with its
    gradient added, s the optimizer's loss scale (1 without one) and r = ``replica_scale``
    (1/R inside a replica of R, else 1).  Traced into the caller's graph.

    When the penalty is inactive (:meth:`PenaltySource.penalty_is_active`) P and the sum
    are one ``tf.cond`` branch away: no penalty work at all while it is zero.  The branch
    boundary also makes XLA write each sum once instead of fusing it into each of the
    optimizer's passes.  Data gradients that are None (unused variables) cannot pass a
    ``tf.cond``; then the sum is built without it.

    Sparse data gradients (``tf.IndexedSlices``: an Embedding table, whose batch reads a
    few rows).  The penalty's gradient λ·A·(θ − μ) is dense -- every row with A > 0, read
    by the batch or not -- so the sum g_j + s·r·∇P_j is a dense tensor (g_j's rows added
    into s·r·∇P_j, :func:`scaled_sum`).  Both branches of a ``tf.cond`` must return the
    same type (and, under XLA, shape), and a dense zero ∇P_j in the inactive branch would
    cost a table-sized write and add; so the inactive branch densifies g_j alone: one
    scatter of the batch's rows into a zero table per step, decided per variable at trace
    time (dense data gradients pass through as they are).  That is what an optimizer that
    updates the table elementwise does with the slices anyway (Keras 3's Adam, SGD with
    momentum: their first elementwise op densifies them); plain SGD loses its sparse
    row update, also while the penalty is inactive.  Correct first: the alternative, an
    ``optimizer.apply`` in each branch, doubles the update in the graph and cannot sit in a
    cond under ``tf.distribute``.
    """
    with tf.name_scope("ewc_penalty"):
        scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32) * replica_scale
        penalized = ewc.model.trainable_variables

        def with_penalty():
            value, penalty_grads = ewc.penalty_and_gradients(inline=True)
            return tf.cast(value, tf.float32), scaled_sum(grads, variables, penalty_grads,
                                                          penalized, scale)

        def without_penalty():
            return tf.constant(0.0), [_dense(g) for g in grads]

        if any(g is None for g in grads):
            return with_penalty()
        penalty, summed = tf.cond(ewc.penalty_is_active(), with_penalty, without_penalty)
        return penalty, list(summed)


def _dense(g):
    """``g`` as a dense tensor (a ``tf.IndexedSlices`` scattered into its dense shape)."""
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


def scaled_sum(grads, variables, penalty_grads, penalized, scale):
    """``g_j + scale·p_j`` for each variable j of ``variables``, where p_j is the entry of
    ``penalty_grads`` (aligned with ``penalized``) for the same variable, if any; a None
    ``g_j`` becomes ``scale·p_j``, and a sparse one (``tf.IndexedSlices``) is added into
    ``scale·p_j`` row by row (:func:`_plus`): p_j covers every row.  Cast to the data
    gradient's (or variable's) dtype."""
    penalty_grads = list(penalty_grads)
    if len(penalty_grads) != len(penalized):
        raise ValueError(
            f"`ewc.penalty_and_gradients()` returned {len(penalty_grads)} gradients for the "
            f"{len(penalized)} trainable variables of its model: it must return one per variable.")
    by_id = {id(v): p for v, p in zip(penalized, penalty_grads)}
    out = []
    for g, v in zip(grads, variables):
        p = by_id.get(id(v))
        if p is None:
            out.append(g)
            continue
        p = tf.cast(p * scale, v.dtype if g is None else g.dtype)
        out.append(p if g is None else _plus(g, p))
    return out


def _plus(g, p):
    """``g + p``, p dense; a sparse ``g`` (``tf.IndexedSlices``) is added into p row by row
    (a scatter-add into p, which is a fresh tensor: no zero table, no second table-sized
    pass, as densifying g first would cost).  Rows listed several times are added in turn,
    so the sum differs from g's dense form plus p only in float32 rounding order."""
    if isinstance(g, tf.IndexedSlices):
        return tf.tensor_scatter_nd_add(p, tf.expand_dims(g.indices, -1), g.values)
    return g + p
