"""Fisher estimation: every method and kind against the floor and the eager loop.

The floor is one compiled forward+backward of the mean loss over the same examples, with
and without XLA (the report takes the faster).  Ratios, not absolute times, are the
result: ``make bench`` then ``python -m benchmarks.report benchmarks/results/latest.json``.
"""
import pytest
import tensorflow as tf

import fastewc
from benchmarks import problems
from benchmarks.conftest import run

KINDS = ["empirical", "sampled", "exact"]
METHODS = {
    "mlp": ["loop", "vmap", "jacobian", "factored"],
    "cnn": ["loop", "vmap", "factored"],
    "transformer": ["loop", "vmap", "factored"],
}
CASES = [(p, m, k) for p, methods in METHODS.items() for m in methods for k in KINDS]
_CACHE = {}


def problem(name, smoke, device):
    """Built once per device (under the device scope the conftest opens)."""
    key = (name, smoke, device)
    if key not in _CACHE:
        _CACHE[key] = problems.make(name, small=smoke)
    return _CACHE[key]


@pytest.mark.parametrize("jit", [False, True], ids=["noxla", "xla"])
@pytest.mark.parametrize("name", list(METHODS))
def test_floor(benchmark, smoke, device, name, jit):
    model, x, y = problem(name, smoke, device)
    benchmark.group = f"{name}-fisher[{device}]"
    benchmark.extra_info.update(role="floor", problem=name)

    @tf.function(jit_compile=jit)
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            value = problems.LOSS(y, model(x, training=False))
        return tape.gradient(value, model.trainable_variables)

    # The last gradient is dense (the first may be an Embedding's IndexedSlices); the whole
    # compiled function runs either way.
    run(benchmark, lambda: forward_backward(x, y)[-1].numpy())


@pytest.mark.parametrize("name,method,kind", CASES, ids=[f"{p}-fisher-{m}-{k}" for p, m, k in CASES])
def test_fisher(benchmark, smoke, device, name, method, kind):
    if smoke and method != "factored" and name != "mlp" and kind != "empirical":
        # The baselines' kinds all run on the MLP; on the CNN and the Transformer one kind
        # shows the benchmark runs (their other kinds took ~70 s of the smoke pass).
        pytest.skip("smoke subset: a baseline's other kinds run on the MLP")
    model, x, y = problem(name, smoke, device)
    benchmark.group = f"{name}-fisher[{device}]"
    benchmark.extra_info.update(role="loop" if method == "loop" else "method", problem=name,
                                method=method, kind=kind)

    def estimate():
        fisher = fastewc.fisher_diagonal(model, (x, y), loss=problems.LOSS, kind=kind, method=method,
                                         batch_size=len(x), seed=0)
        return fisher[0].numpy()

    run(benchmark, estimate, slow=method in ("loop", "jacobian"))
