"""EKFAC-online with the task's S RE-ESTIMATED in the sum basis, for comparison with the
package's rule, which projects it (:mod:`fastewc.blocks.ekfac`, the online merge).

The package's second pass projects each example's gradient on the task's own eigenbasis
U_t (the estimator does not see the EWC's state), and the online merge then projects
S_t onto the eigenbasis V of the decayed factor sums γ A' + A_t, γ G' + G_t.  The exact
EKFAC of the task in V, diag(Vᵀ F_t V), needs V before the second pass.  This script
gets it without changing the package: it patches (in this process only) the second
pass's ``prepare`` to take V, made from the consolidating EWC's factor sums and the
first pass's A_t, G_t, and its ``finish`` to return V as the task's basis; the merge's
``online_term`` (patched too) forms the sums' basis and eigenvalues from the task's own
bases and eigenvalues (A_t = U_t diag(λ_t) U_tᵀ: a block carries eigenvalues, not factors)
and adds S_t as measured in V (its projection onto the merge's V, the same basis up to
signs, is the identity).  Then it runs :mod:`fastewc.demo.compare_curvature`
with the arguments given:

    python -m benchmarks.ekfac_online_exact --cache benchmarks/results/ekfac-online-exact.jsonl \\
        --resume --seeds 0,1,2 --tasks 5 --methods ekfac_online --grid 30
"""
import sys

import tensorflow as tf

from fastewc import ewc as ewc_lib
from fastewc.blocks import ekfac

_CONSOLIDATING = {}
_OWN = {}      # id(S measured in V) → (that S, the task's own U_A, U_G, λ_A, λ_G)


def _patch():
    consolidate, prepare, finish = ewc_lib.EWC.consolidate, ekfac.SecondMoments.prepare, ekfac.SecondMoments.finish
    online_term = ekfac.online_term

    def patched_consolidate(self, *args, **kwargs):
        _CONSOLIDATING["ewc"] = self
        try:
            result = consolidate(self, *args, **kwargs)
        finally:
            _CONSOLIDATING.pop("ewc", None)
        if _OWN:        # a block's S measured in V that the merge did not take as such
            _OWN.clear()
            raise RuntimeError("ekfac_online_exact: the merge did not receive the second pass's S")
        return result

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
        sums = [gamma * old + ekfac.factor(u, lam)
                for old, u, lam in zip(factors, (first.u_a, first.u_g), (first.lam_a, first.lam_g))]
        return tuple(tf.cast(ekfac.eigenbasis(m)[1], tf.float32) for m in sums)

    def patched_prepare(self, first):
        self._sum_basis = sum_basis(self, first)
        prepare(self, first if self._sum_basis is None else
                first._replace(u_a=self._sum_basis[0], u_g=self._sum_basis[1]))

    def patched_finish(self, means, first):
        part = finish(self, means, first)
        basis = getattr(self, "_sum_basis", None)
        if basis is None:
            return part
        _OWN[id(part.s)] = (part.s, first.u_a, first.u_g, first.lam_a, first.lam_g)
        return part._replace(u_a=basis[0], u_g=basis[1])

    def patched_online_term(fields, task, gamma):
        own = _OWN.pop(id(task[2]), None)
        if own is None or own[0] is not task[2]:
            return online_term(fields, task, gamma)
        _, u_a, u_g, lam_a, lam_g = own
        v_a, v_g, old, lam_a, lam_g = online_term(fields, (u_a, u_g, tf.zeros_like(task[2]), lam_a, lam_g), gamma)
        new = ekfac.project(task[2], task[0], task[1], v_a, v_g)
        return [v_a, v_g, old + tf.cast(new, tf.float32), lam_a, lam_g]

    ewc_lib.EWC.consolidate = patched_consolidate
    ekfac.SecondMoments.prepare, ekfac.SecondMoments.finish = patched_prepare, patched_finish
    ekfac.online_term = patched_online_term


if __name__ == "__main__":
    _patch()
    from fastewc.demo import compare_curvature
    compare_curvature.main(sys.argv[1:])
