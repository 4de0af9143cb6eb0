"""How Fisher time and peak memory grow with the data and with the model.

* examples: reference MLP (784-256-256-10), N = 512 … 32768 examples;
* width: MLP 784-w-w-10, w = 256 … 4096, on 512 examples.

Exact Fisher (the EWC default), batch_size 512, methods factored and vmap; the eager loop
only at the small end (it is linear in N and already ~40 s there).  Peak memory comes from
:mod:`benchmarks.memory` and lands in each benchmark's extra_info; the report draws curves.
The smoke pass builds every size as width 16 on 8 examples, so it runs the smallest case of
each method only.
"""
import keras
import numpy as np
import pytest

import fastewc
from benchmarks import problems
from benchmarks.conftest import run
from benchmarks.memory import peak_bytes

EXAMPLES = [512, 2048, 8192, 32768]
WIDTHS = [256, 1024, 4096]
CASES = ([("examples", n, m) for n in EXAMPLES for m in ("factored", "vmap")] + [("examples", 512, "loop")]
         + [("width", w, m) for w in WIDTHS for m in ("factored", "vmap")] + [("width", 256, "loop")])


def build(axis, size, smoke):
    width = size if axis == "width" else 256
    n = size if axis == "examples" else 512
    if smoke:
        width, n = min(width, 16), 8
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(n, 784)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize("axis,size,method", CASES, ids=[f"scaling-{a}-{s}-{m}" for a, s, m in CASES])
def test_scaling(benchmark, smoke, device, axis, size, method):
    if smoke and (axis, size) != ("examples", EXAMPLES[0]):
        pytest.skip("smoke subset: at the smoke size (width 16, 8 examples) every size runs the same code")
    model, x, y = build(axis, size, smoke)
    benchmark.group = f"scaling-{axis}[{device}]"

    def estimate():
        return fastewc.fisher_diagonal(model, (x, y), loss=problems.LOSS, kind="exact", method=method,
                                       batch_size=512)[0].numpy()

    _, peak, how = peak_bytes(estimate, device)       # first call: includes tracing
    _, peak_again, _ = peak_bytes(estimate, device)   # steady state
    benchmark.extra_info.update(role="scaling", axis=axis, size=size, method=method,
                                params=int(model.count_params()), examples=len(x),
                                peak_bytes=int(max(peak, peak_again)), peak_measure=how)
    run(benchmark, estimate, slow=True)
