"""``python -m fastewc demo``: catastrophic forgetting on real data, EWC preventing it, and
how fast fastewc's Fisher is.

Scenarios (:mod:`fastewc.demo.scenarios`, on ``sklearn.datasets.load_digits``):
permuted digits (default; shared 10-way head) and split digits (shared 2-way head,
label = digit mod 2).  Methods, trained one after the other from the same initialisation
on the same batches: ``finetune`` (no EWC), ``ewc_separate`` and ``ewc_online``.
Metrics (:mod:`fastewc.demo.metrics`): the accuracy matrix, average accuracy after the
last task, average forgetting (Chaudhry et al. 2018).  Outputs: ``results.json``,
``accuracy.png`` and TensorBoard scalars in the output folder.
"""
from fastewc.demo.run import METHODS, DemoConfig, run_demo

__all__ = ["METHODS", "DemoConfig", "run_demo"]
