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
