"""Graph sizes behind the first call: GPT-2 base's 12 layers (at hidden 64: op counts do not
depend on the widths), the floor's compiled forward+backward against the Fisher's batch
function (ops, the rules' ops under their ``rules/<layer>`` name scopes, constants), and
the first calls' times (floor: trace, then compile + run; Fisher: plan, then trace + compile
+ run), on 4 × 128 tokens.

    .venv/bin/python -m benchmarks.graph_size xla      # or noxla
"""
import json
import sys
import time

import numpy as np
import keras

import fastewc
from benchmarks import models, problems

SIZES = dict(vocabulary_size=1000, num_layers=12, num_heads=2, hidden_dim=64, intermediate_dim=128,
             max_sequence_length=128)


def main(argv=None):
    jit = (argv or ["xla"])[0] == "xla"
    keras.utils.set_random_seed(0)
    model = models.gpt2_classifier(SIZES)
    rng = np.random.default_rng(0)
    x, y = models._gpt2_inputs(rng, 4, 128), rng.integers(0, models.CLASSES, 4).astype(np.int32)
    out = {"jit_compile": jit}

    floor = problems.floor_function(model, jit, models.LOSS)
    start = time.perf_counter()
    concrete = floor.function.get_concrete_function(x, y)
    out["floor_trace_s"] = time.perf_counter() - start
    out["floor_ops"] = len(concrete.graph.get_operations())
    start = time.perf_counter()
    floor(x, y)
    out["floor_compile_run_s"] = time.perf_counter() - start
    for kind in ("empirical", "sampled"):
        estimator = fastewc.FisherEstimator(model, loss=models.LOSS, kind=kind, jit_compile=jit)
        start = time.perf_counter()
        plan = estimator.plan((x, y))
        out[f"{kind}_plan_s"] = time.perf_counter() - start
        start = time.perf_counter()
        estimator((x, y), seed=0)[-1].numpy()
        out[f"{kind}_trace_compile_run_s"] = time.perf_counter() - start
        ops = next(iter(plan.engine._concrete.values())).graph.get_operations()
        out.update({f"{kind}_ops": len(ops), f"{kind}_rule_ops": sum("rules/" in op.name for op in ops),
                    f"{kind}_const_ops": sum(op.type == "Const" for op in ops)})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
