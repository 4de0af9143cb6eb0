"""``python -m fastewc demo``: catastrophic forgetting on real data, EWC preventing it, and
how fast fastewc's Fisher is.

Scenarios (:mod:`fastewc.demo.scenarios`, on ``sklearn.datasets.load_digits``):
permuted digits (default; shared 10-way head) and split digits (shared 2-way head,
label = digit mod 2).  Methods, trained one after the other from the same initialisation
on the same batches: ``finetune`` (no EWC), ``ewc_separate`` and ``ewc_online``; with
``--curvature kfac`` also KFAC-EWC, ``kfac_separate`` and ``kfac_online`` (Ritter, Botev &
Barber 2018: a Kronecker-factored Fisher block per Dense layer).
Metrics (:mod:`fastewc.demo.metrics`): the accuracy matrix, average accuracy after the
last task, average forgetting (Chaudhry et al. 2018).  Outputs: ``results.json``,
``accuracy.png`` and TensorBoard scalars in the output folder.

:mod:`fastewc.demo.compare_curvature` is the experiment behind the README's comparison of
fine-tuning, diagonal EWC and KFAC-EWC (λ tuned on a held-out split, several seeds);
:mod:`fastewc.demo.penalty_shape` measures how the two penalties differ on the demo's model.
"""
from fastewc.demo.run import KFAC_METHODS, METHODS, DemoConfig, run_demo

__all__ = ["METHODS", "KFAC_METHODS", "DemoConfig", "run_demo"]
