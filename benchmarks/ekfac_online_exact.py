"""EKFAC-online with the task's S RE-ESTIMATED in the sum basis, for comparison with the
package's rule, which projects it (:mod:`fastewc.blocks.ekfac`, the online merge).

The package's second pass projects each example's gradient on the task's own eigenbasis
U_t (the estimator does not see the EWC's state), and the online merge then projects
S_t onto the eigenbasis V of the decayed factor sums γ A' + A_t, γ G' + G_t.  The exact
EKFAC of the task in V, diag(Vᵀ F_t V), needs V before the second pass.  This script
gets it without changing the package: it patches (in this process only) the second
pass's ``prepare`` to take V, made from the consolidating EWC's factor sums and the
first pass's A_t, G_t, and its ``finish`` to return V as the task's basis, so the merge's
projection of S_t is the identity.  Then it runs :mod:`fastewc.demo.compare_curvature`
with the arguments given:

    python -m benchmarks.ekfac_online_exact --cache benchmarks/results/ekfac-online-exact.jsonl \\
        --resume --seeds 0,1,2 --tasks 5 --methods ekfac_online --grid 30
"""
import sys

import tensorflow as tf

from fastewc import ewc as ewc_lib
from fastewc.blocks import ekfac

_CONSOLIDATING = {}


def _patch():
    consolidate, prepare, finish = ewc_lib.EWC.consolidate, ekfac.SecondMoments.prepare, ekfac.SecondMoments.finish

    def patched_consolidate(self, *args, **kwargs):
        _CONSOLIDATING["ewc"] = self
        try:
            return consolidate(self, *args, **kwargs)
        finally:
            _CONSOLIDATING.pop("ewc", None)

    def sum_basis(block, first):
        """V_A, V_G of γ A' + A_t, γ G' + G_t (as the merge makes them), or None (not an
        online EWC, or a block without factor sums yet: the task's own basis)."""
        ewc = _CONSOLIDATING.get("ewc")
        if ewc is None or ewc.mode != "online":
            return None
        keys = tuple(ewc._tracking.key(v) for v in block.variables)
        factors = ekfac.EKFAC.factor_sums(ewc._state.variables(ekfac.EKFAC)).get(
            keys if len(keys) == 2 else keys + (None,))
        if factors is None:
            return None
        gamma = float(ewc.gamma)
        sums = [gamma * tf.cast(old, tf.float64) + tf.cast(new, tf.float64)
                for old, new in zip(factors, (first.a, first.g))]
        return tuple(tf.cast(ekfac.eigenbasis(m)[1], tf.float32) for m in sums)

    def patched_prepare(self, first):
        self._sum_basis = sum_basis(self, first)
        prepare(self, first if self._sum_basis is None else
                first._replace(u_a=self._sum_basis[0], u_g=self._sum_basis[1]))

    def patched_finish(self, means, first):
        part = finish(self, means, first)
        basis = getattr(self, "_sum_basis", None)
        return part if basis is None else part._replace(u_a=basis[0], u_g=basis[1])

    ewc_lib.EWC.consolidate = patched_consolidate
    ekfac.SecondMoments.prepare, ekfac.SecondMoments.finish = patched_prepare, patched_finish


if __name__ == "__main__":
    _patch()
    from fastewc.demo import compare_curvature
    compare_curvature.main(sys.argv[1:])
