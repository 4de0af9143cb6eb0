"""Fisher engines behind one interface (:class:`fastewc.engines.base.Engine`).

| engine   | how                                                          | cost              |
|----------|--------------------------------------------------------------|-------------------|
| factored | per-layer rules on the deltas of one forward pass            | 1 fwd + K bwd     |
| vmap     | ``tf.vectorized_map`` of per-example gradients               | N·K bwd, vectorized|
| jacobian | ``GradientTape.jacobian`` of the N·K linearised losses       | as vmap, slower   |
| loop     | eager, one GradientTape per example (baseline and reference) | N·K eager passes  |
"""
from fastewc.engines.base import Engine, FisherState, initial_state
from fastewc.engines.factored import FactoredEngine
from fastewc.engines.loop import LoopEngine
from fastewc.engines.per_example import JacobianEngine, VmapEngine

ENGINES = {cls.name: cls for cls in (FactoredEngine, VmapEngine, JacobianEngine, LoopEngine)}

__all__ = ["ENGINES", "Engine", "FisherState", "initial_state", "FactoredEngine", "VmapEngine",
           "JacobianEngine", "LoopEngine"]
