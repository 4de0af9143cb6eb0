"""The diagonal kind: one F_i per parameter of one variable (:mod:`fastewc.fisher`).

    F_i = (1/N) Σ_n E_{y ~ q_n} [ (∂ℓ(y, x_n; θ)/∂θ_i)² ]

Every variable no other block covers is a diagonal block, whatever the curvature chosen.
Its per-batch sum is Σ_n Σ_k W_kn g_kn² (shaped like the variable), from a rule's
weighted square sums (:meth:`fastewc.registry.RuleOutput.square_sums`) or from the
per-example gradients of the vmap, jacobian and loop engines; its mean is F itself.  The
sums are one float per parameter, so each batch's compiled function also forms the mean
(the passes fuse there) and XLA is the CPU default (:mod:`fastewc._policy`).
"""
from fastewc.blocks.base import Block


def _path(variable):
    return getattr(variable, "path", None) or variable.name


class Diagonal(Block):
    """The diagonal of one variable's Fisher."""
    kind = "diagonal"

    def __init__(self, variable):
        self.variables = (variable,)
        self.sum_shapes = (tuple(variable.shape),)
        self.sum_names = (_path(variable),)

    # -- estimation ------------------------------------------------------------------------
    @classmethod
    def rule_sums(cls, result, delta, weight, mask):
        return {(cls.kind, id(variable)): (value,) for variable, value in result.square_sums(delta, weight)}

    def gradient_sums(self, squares):
        return (squares[id(self.variables[0])],)

    def finish(self, means):
        return means[0]

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """The list of float32 tensors, one per variable, shaped like it."""
        return list(parts)
















    # -- state -----------------------------------------------------------------------------
