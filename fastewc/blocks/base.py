"""The block interface every curvature kind implements (:mod:`fastewc.blocks`).

Work in progress (issue 25): the estimation half and the state half are filled in by
two branches; each section below belongs to one of them.
"""


class Block:
    """One block of curvature over ``variables`` (model variables, in the model's order).

    # -- estimation half (engines, estimator, plan) -----------------------------------
    # sum_shapes, batch_sums(...), finish(means) -> estimate















    # -- state half (EWC: state, merge, penalty, file, checkpoint) ---------------------
    # init/merge(state, estimate, anchor, config) -> new state (pure), penalty(thetas,
    # state, lam, config) -> (value, grads), to_file/from_file, checkpoint keys
    """


# -- state half (EWC: state, merge, penalty, file, checkpoint) -------------------------------
# A kind's state methods are static (a block, on the EWC side, is its ``key`` and its
# values).  A block's state is a flat list of float32 tensors (``fields``), stored by
# :class:`fastewc.blocks.store.State` as tf.Variables, each checkpointed at one address
# ``(table, table key)`` of the kind's ``TABLES``:
#
# * ``OPTIONS``: the EWC options it reads; ``TABLES``: ``{table: checkpoint path}``;
#   ``FILE_FIELD`` / ``FILE_VERSION``: its field of :class:`fastewc.ewc_file.EWCFile` and
#   the file version that holds it.
# * ``check_result(result, source, tracking)``: refuse a Fisher result it cannot use;
#   ``estimate(result, source, tracking)`` → ``{key: estimate}`` of a task.
# * ``merge(current, task, settings, tracking)`` → ``({key: fields}, Δc)``: pure (nothing
#   assigned), every block the task changes, raising (naming the variable or layer) for an
#   estimate or a result float32 cannot hold.
# * ``penalty(thetas, fields, lam, damping)`` → ``(value, [gradient per theta])``, traced
#   inline into the one compiled penalty (:mod:`fastewc.blocks.penalty`); ``explain(thetas,
#   fields, lam)`` says why a value is not finite.
# * ``model_variables(key, by_key)``, ``label(key)``, ``num_terms(fields)``,
#   ``snapshot(blocks)``: the block's variables, name, terms and public copy.
# * ``addresses(key, n)``, ``from_checkpoint(tables, tracking, current)``: checkpoint keys
#   and the checked restore; ``to_file`` / ``from_file``, ``file_arrays`` /
#   ``file_shapes`` / ``read_file_arrays``: the file section.
#   (Their task types and helpers: :mod:`fastewc.blocks.task`.)
