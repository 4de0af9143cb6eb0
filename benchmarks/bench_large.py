"""Fisher estimation at real sizes (issue 24): GPT-2 base, MobileNetV2, ResNet50, ViT-B/16.

Rows (:data:`ROWS`, random weights, logits, ``models.LOSS``):

* ``gpt2_base``: keras_hub ``GPT2Backbone`` in GPT-2 base's configuration (12 layers, 12
  heads, hidden 768, intermediate 3072, vocabulary 50257, 1024 positions) with Dense(10)
  on the last token (:func:`benchmarks.models.gpt2_classifier`), 4 × 128 tokens;
* ``gpt2_base_lm``: the same backbone as ``GPT2CausalLM`` (tied embeddings, per-token
  likelihood over 50257 classes, :func:`benchmarks.models.gpt2_causal_lm`), 4 × 128 tokens
  with random lengths and their padding mask, labels the next tokens;
* ``mobilenet_v2`` (16 images) and ``resnet50`` (8): ``keras.applications`` at 224×224×3,
  1000 classes, ``weights=None``, BatchNorm statistics calibrated on one batch
  (:func:`benchmarks.models.calibrate`);
* ``vit_b16``: keras_hub ``ViTBackbone`` in ViT-B/16's configuration (224×224, patch 16, 12
  layers, 12 heads, hidden 768, MLP 3072) with Dense(1000) on the class token, 4 images.

Token ids are drawn from the first ``models.VOCAB`` entries (the samplers of
:mod:`benchmarks.models`); the cost does not depend on which ids.

Members per row: ``floor_xla`` and ``floor_noxla`` (:func:`benchmarks.problems.floor_function`,
the same model's compiled forward+backward of the mean loss; the faster is "the floor"),
and one ``fastewc.FisherEstimator(model, loss=LOSS, kind=...)`` per kind, default arguments
(``method="auto"``, default ``batch_size`` and ``jit_compile``): ``empirical``, ``sampled``
(one draw) and ``exact``.  Exact runs where K (``plan.num_cotangents``) is at most
``EXACT_BUDGET`` backward passes; above, the member only makes the plan, which is where
fastewc refuses an unaffordable exact kind before any work
(``fastewc.likelihood.Likelihood.check_exact_cost``): the record says whether it refused
(and how fast), or that it would have run K passes (``exact_not_run``).

Each member runs in its OWN process (``python -m benchmarks.bench_large --child ROW
MEMBER``), so that its peak resident memory is its own: the process builds the model and
the data, reads its resident set (``rss_model_bytes``), resets the kernel's high-water mark
(``/proc/self/clear_refs``), makes the first call (trace + compile + one run: ``first_call_s``,
peak ``first_peak_bytes``), resets again, then makes ``rounds`` steady calls
(``steady_s``, peak ``steady_peak_bytes``).  Peaks are the process's VmHWM (resident,
absolute, model and data included: floor and Fisher processes hold the same model, so the
difference is what the Fisher adds).  ``FASTEWC_BENCH_LOCK=<file>`` makes each child hold
an exclusive lock on that file while it runs (one 124M-parameter process at a time on a
shared machine); ``FASTEWC_BENCH_LARGE_MEMBERS=floor_noxla,empirical`` runs only those members.

    FASTEWC_BENCH_LOCK=/tmp/fastewc-large.lock .venv/bin/python -m pytest \\
        benchmarks/bench_large.py --benchmark-only -q -o python_files=bench_*.py \\
        --benchmark-json=large.json [-k vit]
    .venv/bin/python -m benchmarks.report_models large.json

One child alone (JSON on the last line; ``--batch-size`` / ``--jit`` pass to the estimator,
how the memory of a chunk size is measured):

    .venv/bin/python -m benchmarks.bench_large --child gpt2_base empirical --batch-size 2

Smoke mode (``--benchmark-disable``, the second half of ``make test``): the keras_hub rows in
a tiny configuration (:data:`SMOKE_HUB`, images of 32 px, ``models.SMOKE_EXAMPLES``
examples of ``models.SMOKE_LENGTH`` tokens), in this process, the members of :data:`SMOKE`
(first calls only; the exact kind's plan only); the Applications at 224 px are not smoked
(compiling their Fisher functions takes tens of seconds each, as in ``bench_models.py``).
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import typing
import warnings

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastewc  # noqa: E402
from benchmarks import models, problems  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMBERS = ("floor_xla", "floor_noxla", "empirical", "sampled", "exact")
FLOORS = {"floor_xla": True, "floor_noxla": False}
# Not in MEMBERS (run on request: FASTEWC_BENCH_LARGE_MEMBERS or --child): the float64
# accumulation of a batch's sums alone (:func:`_fold_alone`), with and without XLA.
FOLDS = {"fold_xla": True, "fold_noxla": False}
# Smoke mode: the members per row (others skipped): the ViT (its patch embedding's rule) once
# each, and the exact kind's plan (refused on the causal LM) of the GPT-2 rows; compiling a
# GPT-2 Fisher function takes ~20 s even this small, and bench_models.py smokes those.
SMOKE = {"vit_b16": ("floor_noxla", "empirical", "exact"), "gpt2_base": ("exact",), "gpt2_base_lm": ("exact",)}
EXACT_BUDGET = 64            # exact runs up to this many backward passes per example
STEADY_BUDGET_S = 20.0       # steady rounds: about this long in total, within ROUNDS
ROUNDS = (3, 7)
CHILD_TIMEOUT_S = 3600
RESULT_TAG = "BENCH_LARGE_RESULT "
IMAGE = (224, 224, 3)
CLASSES = 1000
LENGTH = 128
GPT2_BASE = dict(vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
                 max_sequence_length=1024)
VIT_B16 = dict(image_shape=IMAGE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
# The smoke configurations of the keras_hub rows.
SMOKE_HUB = dict(gpt2=models._HUB_SIZES,
                 vit=dict(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                          mlp_dim=64))


class Row(typing.NamedTuple):
    build: typing.Callable        # build(small) -> keras.Model
    sample: typing.Callable       # sample(rng, n, small) -> (x, y)
    examples: int
    family: str                   # "application" or "hub"
    describe: str                 # "(input, batch)" for the report


def _application(name):
    def build(small):
        return getattr(keras.applications, name)(input_shape=IMAGE, weights=None, classes=CLASSES,
                                                  classifier_activation=None)
    return build


def _images(rng, n, small, shape=IMAGE, classes=CLASSES):
    x = rng.uniform(-1, 1, size=(n,) + shape).astype(np.float32)
    return x, rng.integers(0, classes, size=n).astype(np.int32)


def _vit(small):
    import keras_hub
    backbone = keras_hub.models.ViTBackbone(**(SMOKE_HUB["vit"] if small else VIT_B16))
    logits = keras.layers.Dense(models.CLASSES if small else CLASSES)(backbone.output[:, 0, :])
    return keras.Model(backbone.input, logits, name="vit_classifier")


def _vit_images(rng, n, small):
    if small:
        return _images(rng, n, small, SMOKE_HUB["vit"]["image_shape"], models.CLASSES)
    return _images(rng, n, small)


def _length(small):
    return models.SMOKE_LENGTH if small else LENGTH


def _gpt2_tokens(rng, n, small):
    return models._gpt2_inputs(rng, n, _length(small)), rng.integers(0, models.CLASSES, size=n).astype(np.int32)


def _gpt2_lm_tokens(rng, n, small):
    x = models._gpt2_lm_inputs(rng, n, _length(small))
    return x, models._next_tokens(rng, x)


ROWS = {
    "gpt2_base": Row(lambda small: models.gpt2_classifier(SMOKE_HUB["gpt2"] if small else GPT2_BASE),
                     _gpt2_tokens, 4, "hub", f"Dense(10) on the last token, 4 × {LENGTH} tokens"),
    "gpt2_base_lm": Row(lambda small: models.gpt2_causal_lm(SMOKE_HUB["gpt2"] if small else GPT2_BASE),
                        _gpt2_lm_tokens, 4, "hub", f"GPT2CausalLM per token, 4 × {LENGTH} tokens"),
    "mobilenet_v2": Row(_application("MobileNetV2"), _images, 16, "application", "224×224, 1000 classes, 16"),
    "resnet50": Row(_application("ResNet50"), _images, 8, "application", "224×224, 1000 classes, 8"),
    "vit_b16": Row(_vit, _vit_images, 4, "hub", "224×224, Dense(1000) on the class token, 4"),
}


def make(name, small, seed=0):
    """(model, x, y) of row ``name`` (``small``: the smoke configuration)."""
    row = ROWS[name]
    keras.utils.set_random_seed(seed)
    model = row.build(small)
    rng = np.random.default_rng(seed)
    n = models.SMOKE_EXAMPLES if small else row.examples
    if row.family == "application":
        models.calibrate(model, row.sample(rng, n, small)[0])
    x, y = row.sample(rng, n, small)
    return model, x, y


# -- one member, measured in its own process ----------------------------------------------
def _status(field):
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


def _reset_peak():
    """Reset the process's resident high-water mark (VmHWM); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(name, member, *, small=False, batch_size=None, jit_compile=None, rounds=None):
    """One member of one row in this process: the record the parent stores (module docstring)."""
    model, x, y = make(name, small)
    record = {"row": name, "member": member, "examples": len(y), "params": models.num_params(model),
              "rss_model_bytes": _status("VmRSS")}
    if member in FLOORS:
        floor = problems.floor_function(model, FLOORS[member])
        call = lambda: floor(x, y)                  # noqa: E731
    elif member in FOLDS:
        call = _fold_alone(model, FOLDS[member])
    else:
        options = {} if batch_size is None else {"batch_size": batch_size}
        if jit_compile is not None:
            options["jit_compile"] = jit_compile
        estimator = fastewc.FisherEstimator(model, loss=models.LOSS, kind=member, **options)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                plan = estimator.plan((x, y))
            except ValueError as err:               # an unaffordable exact kind, refused
                if member != "exact":
                    raise
                record.update(refused=f"{type(err).__name__}: {err}", refused_after_s=time.perf_counter() - start)
                return record
        record["warnings"] = [str(w.message)[:300] for w in caught if "fastewc" in str(w.message)]
        record["plan"] = {"method": plan.method, "K": plan.num_cotangents, "rows": plan.rows,
                          "jit_compile": bool(plan.engine.jit_compile)}
        if member == "exact" and plan.num_cotangents > EXACT_BUDGET:
            record["exact_not_run"] = f"K = {plan.num_cotangents} backward passes per example > {EXACT_BUDGET}"
            return record
        if member == "exact" and small:
            return record                           # smoke: the plan only
        seed = dict(seed=0) if member == "sampled" else {}
        call = lambda: estimator((x, y), **seed)[-1].numpy()    # noqa: E731
    reset = _reset_peak()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    record["first_call_s"] = time.perf_counter() - start
    record.setdefault("warnings", []).extend(str(w.message)[:300] for w in caught if "fastewc" in str(w.message))
    record["first_peak_bytes"] = _status("VmHWM")
    if small:
        return record
    _reset_peak()
    times = []
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
    rounds = rounds or int(np.clip(np.ceil(STEADY_BUDGET_S / max(times[0], 1e-6)), *ROUNDS))
    for _ in range(rounds - 1):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    record.update(steady_s=times, steady_peak_bytes=_status("VmHWM"), peak_reset=reset)
    return record


def _fold_alone(model, jit_compile):
    """The Fisher's float64 accumulation alone: one compiled :func:`fastewc.engines.base.fold`
    of per-variable sums shaped like the model's trainable variables into float64 totals,
    as the engines run it after each batch of a call of several batches."""
    import tensorflow as tf
    from fastewc.engines import base
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    batch = base.BatchSums(tuple(tf.ones(shape, tf.float32) for shape in shapes), [], tf.constant([0.0, 1.0]))
    count = tf.constant(4, tf.int32)
    state = base.fold(batch, count, base.initial_state())
    fold = tf.function(base.fold, jit_compile=jit_compile, autograph=False)
    return lambda: fold(batch, count, state).checks.numpy()


@contextlib.contextmanager
def _locked():
    """Hold ``$FASTEWC_BENCH_LOCK`` (if set) exclusively: one heavy process at a time."""
    path = os.environ.get("FASTEWC_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_child(name, member, **options):
    """``measure`` in a fresh process: its record, or {"error": ...} if the process failed."""
    command = [sys.executable, "-m", "benchmarks.bench_large", "--child", name, member]
    for flag, value in options.items():
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"row": name, "member": member, "error": tail[:300], "returncode": done.returncode}


def members():
    chosen = os.environ.get("FASTEWC_BENCH_LARGE_MEMBERS")
    return tuple(m for m in MEMBERS + tuple(FOLDS) if (m in chosen.split(",") if chosen else m in MEMBERS))


def _summary(info, records):
    """The fields ``benchmarks.report_models`` reads (the bench_models layout)."""
    info.update(
        medians={m: float(np.median(r["steady_s"])) for m, r in records.items() if "steady_s" in r},
        mins={m: float(np.min(r["steady_s"])) for m, r in records.items() if "steady_s" in r},
        first_call_s={m: r["first_call_s"] for m, r in records.items() if "first_call_s" in r},
        plans={m: r["plan"] for m, r in records.items() if "plan" in r},
        errors={m: r["error"] for m, r in records.items() if "error" in r},
        first_call_peak_bytes={m: r["first_peak_bytes"] for m, r in records.items() if "first_peak_bytes" in r},
        peak_bytes={m: r["steady_peak_bytes"] for m, r in records.items() if "steady_peak_bytes" in r},
        peak_measure="process VmHWM (absolute resident peak), one process per member")


@pytest.mark.parametrize("name", list(ROWS))
def test_large(benchmark, smoke, device, name):
    row = ROWS[name]
    if smoke and name not in SMOKE:
        pytest.skip(f"{name}: not in the smoke pass (bench_large.py docstring says why)")
    if row.family == "hub":
        pytest.importorskip("keras_hub")
    if device != "CPU:0":
        pytest.skip("bench_large measures process resident memory: CPU only")
    benchmark.group = f"large-{name}[{device}]"
    info = benchmark.extra_info
    info.update(role="large", model=name, describe=row.describe)
    if smoke:
        records = {}
        benchmark(lambda: records.update({m: measure(name, m, small=True) for m in SMOKE[name]}))
        assert "refused" in records["exact"] or "plan" in records["exact"], records["exact"]
    else:
        records = {}
        for member in members():
            records[member] = run_child(name, member)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    first = next(iter(records.values()))
    info.update(examples=first.get("examples"), params=first.get("params"), records=records)
    _summary(info, records)
    failed = {m: r["error"] for m, r in records.items() if "error" in r}
    assert not failed, failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("ROW", "MEMBER"), required=True)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--jit", choices=("true", "false"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    name, member = args.child
    jit = None if args.jit is None else args.jit == "true"
    with _locked():
        record = measure(name, member, small=args.small, batch_size=args.batch_size, jit_compile=jit,
                         rounds=args.rounds)
    print(RESULT_TAG + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
